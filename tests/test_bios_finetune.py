"""Fine-tuning a trained run: exact starting weights, the replay share, people recorded by content, the
optimizer-state option, rare already-seen people, attention drift, and the command."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from factlens.bios.attention_drift import attention_drift, pattern_tv
from factlens.bios.finetune import finetune_config
from factlens.bios.run import Run
from factlens.bios.task import BiosTask, people_slice
from factlens.bios.trainer import TrainConfig, Trainer, train
from factlens.checkpoints import list_checkpoints, load_checkpoint
from factlens.errors import CheckpointError, ConfigError

TINY_POOLS = dict(first_names=30, last_names=30, cities=20, universities=10, majors=8, companies=10, years=20)


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    config = TrainConfig.preset("tiny", steps=20, n_people=48, batch_size=8, n_eval_sequences=16, n_unseen=8,
                                checkpoint_every=10, log_every=5, resume_every=10, pools=TINY_POOLS,
                                eval_batch_size=16, lr=3e-3,
                                sampler={"kind": "celebrities", "n_celebrities": 8, "weight": 4.0})
    train(config, out, progress=False)
    return out


def test_finetuning_starts_from_the_exact_pretrained_weights_with_a_fresh_optimizer(pre, tmp_path):
    config = finetune_config(pre, n_new=16, old_weight=0.5, steps=10, lr=1e-3, checkpoint_every=5)
    trainer = Trainer(config, tmp_path, progress=False)
    base = load_checkpoint(pre / "checkpoints" / "step_0000020").state
    state = trainer.raw_model.state_dict()
    assert base.keys() <= state.keys() and all(torch.equal(v, state[k]) for k, v in base.items())
    assert trainer.optimizer.state_dict()["state"] == {}  # fresh AdamW
    early = finetune_config(pre, step=10, n_new=16, steps=10, lr=1e-3)
    at_10 = load_checkpoint(pre / "checkpoints" / "step_0000010").state
    assert all(torch.equal(v, Trainer(early, tmp_path / "b", progress=False).raw_model.state_dict()[k])
               for k, v in at_10.items())


def test_keep_optimizer_carries_the_pretraining_adamw_state(pre, tmp_path):
    config = finetune_config(pre, n_new=16, steps=10, lr=1e-3, keep_optimizer=True)
    trainer = Trainer(config, tmp_path, progress=False)
    saved = load_checkpoint(pre / "resume" / "step_0000020").training_state()["optimizer"]
    mine = trainer.optimizer.state_dict()
    assert len(mine["state"]) == len(saved["state"]) > 0
    for k, v in saved["state"].items():
        assert torch.equal(mine["state"][k]["exp_avg_sq"], v["exp_avg_sq"])
    with pytest.raises(CheckpointError, match="resume checkpoints only at"):
        Trainer(finetune_config(pre, step=0, n_new=16, steps=10, keep_optimizer=True), tmp_path / "b",
                progress=False)


@pytest.mark.parametrize("w", [0.0, 0.05, 0.5, 3.0])
def test_replay_stream_old_share_is_its_definition(pre, w):
    config = finetune_config(pre, n_new=16, old_weight=w, steps=10)
    task = BiosTask.build(config)
    n_old, n_new = 48, 16
    share = n_old * w / (n_old * w + n_new)
    people = torch.cat([task.stream.batch(s).people for s in range(400)]).numpy()  # 3,200 draws
    old = people < n_old
    assert abs(old.mean() - share) <= 5 * np.sqrt(share * (1 - share) / len(people)) + 1e-12
    if w == 0:
        assert not old.any() and len(np.unique(people)) == n_new
    assert np.isclose(task.stream.sampler.probabilities(0)[:n_old].sum(), share)


def test_the_config_records_old_and_new_people_by_content_and_readers_check_them(pre, tmp_path):
    config = finetune_config(pre, n_new=16, steps=10)
    ft = config.finetune
    population = Run(pre).population()
    assert ft.population_sha256 == population.fingerprint()
    task = BiosTask.build(config)
    assert ft.new_population_sha256 == people_slice(task.population, 48, 64).fingerprint()
    assert people_slice(task.population, 0, 48).fingerprint() == ft.population_sha256
    for field in ("population_sha256", "new_population_sha256"):
        forged = dataclasses.replace(config, finetune=dataclasses.replace(ft, **{field: "0" * 16}))
        with pytest.raises(ConfigError, match="not the"):
            BiosTask.build(forged)
    with pytest.raises(ConfigError, match="itself a fine-tuning run"):
        train(dataclasses.replace(config, steps=2, checkpoint_every=1), tmp_path, progress=False)
        finetune_config(tmp_path, n_new=4)


def test_rare_seen_people_are_the_run_s_own_tail(pre):
    config = finetune_config(pre, seen_from=8, old_weight=0.0, steps=10)
    task = BiosTask.build(config)
    population = Run(pre).population()
    assert len(task.population) == 48 and task.population.equals(population)
    people = torch.cat([task.stream.batch(s).people for s in range(50)])
    assert int(people.min()) >= 8  # only the already-seen non-celebrities
    assert set(task.eval_sets) == {"old_", "new_", "unseen_"}
    with pytest.raises(ConfigError, match="seen_from"):
        finetune_config(pre, seen_from=48, steps=10)


def test_pattern_tv_is_half_l1_averaged_over_real_queries():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(2, 3, 5, 5, generator=g), -1)
    b = torch.softmax(torch.randn(2, 3, 5, 5, generator=g), -1)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    hand = [0.5 * float((a[i, h, q].double() - b[i, h, q].double()).abs().sum()) for i in range(2) for h in range(3) for q in range(5)
            if mask[i, q]]
    assert pattern_tv(a, b, mask) == pytest.approx(sum(hand) / len(hand), rel=1e-12)
    assert pattern_tv(a, a, mask) == 0.0


@pytest.mark.slow  # a fine-tuning run and its attention drift through the CLI (9-14 s): .ci/run runs it in its slow step
def test_cli_finetune_writes_curves_summary_and_attention_drift(pre, tmp_path, capsys):
    from factlens.cli import main

    out = tmp_path / "ft"
    assert main(["bios", "finetune", "--run", str(pre), "--new-people", "16", "--replay", "0.25", "--steps", "10",
                 "--lr", "1e-3", "--eval-every", "5", "--drift-sequences", "8", "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if r["kind"] == "eval"]
    for prefix in ("old_", "new_", "unseen_"):
        assert {prefix + k for k in ("attr_loss", "attr_acc", "top_prob", "entropy")} <= set(ev[0])
    summary = json.loads((out / "forgetting.json").read_text())
    assert summary["old_acc_start"] == ev[0]["old_attr_acc"] and summary["old_acc_end"] == ev[-1]["old_attr_acc"]
    assert list_checkpoints(out / "checkpoints") == [0, 5, 10]
    drift = attention_drift(out, n_sequences=8, progress=False)
    first = drift.tv[drift.tv["step"] == 0]
    assert len(first) == 2 and (first["tv"] == 0).all()  # step 0 is the pre-trained model itself
    assert (drift.tv[drift.tv["step"] == 10]["tv"] > 0).all()
    assert (out / "attention_drift.html").exists() and "old_attr_acc" in drift.to_dataframe()
    assert main(["bios", "finetune", "--run", str(pre), "--non-celebrities", "--steps", "4", "--lr", "1e-3",
                 "--eval-every", "2", "--drift-sequences", "0", "--out", str(tmp_path / "rare"), "--quiet"]) == 0
    assert json.loads((tmp_path / "rare" / "config.json").read_text())["finetune"]["seen_from"] == 8
