"""The biography training loop: it learns, resumes exactly after SIGKILL, and DDP matches one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import factlens
from ddp import torchrun
from factlens.bios.run import Run
from factlens.bios.trainer import TrainConfig, Trainer, cosine_lr, train
from factlens.checkpoints import list_checkpoints, load_checkpoint

TINY_POOLS = dict(first_names=30, last_names=30, cities=20, universities=10, majors=8, companies=10, years=20)


def tiny_config(**overrides) -> TrainConfig:
    base = dict(steps=20, n_people=48, batch_size=8, n_eval_sequences=16, n_unseen=8, checkpoint_every=10,
                log_every=5, resume_every=5, pools=TINY_POOLS, eval_batch_size=16)
    base.update(overrides)
    return TrainConfig.preset("tiny", **base)


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def test_cosine_schedule():
    assert cosine_lr(0, 100, 4e-4, 1e-7) == pytest.approx(4e-4)
    assert cosine_lr(100, 100, 4e-4, 1e-7) == pytest.approx(1e-7)
    assert cosine_lr(50, 100, 4e-4, 1e-7) == pytest.approx((4e-4 + 1e-7) / 2)


def test_training_learns_and_writes_everything(tmp_path):
    history = train(tiny_config(steps=30, lr=3e-3), tmp_path, progress=False)
    assert list_checkpoints(tmp_path / "checkpoints") == [0, 10, 20, 30]
    assert history.evals["attr_loss"].iloc[-1] < history.evals["attr_loss"].iloc[0]
    losses = [loss for _, loss in train_losses(tmp_path)]
    assert losses[-1] < losses[0]
    assert {"unseen_attr_loss", "unseen_top_prob", "unseen_entropy"} <= set(history.evals.columns)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "step_0000030")
    assert ckpt.config["steps"] == 30 and ckpt.manifest["data_seed"] == 0
    fig = history.plot()
    assert fig.layout.xaxis.title.text == "training step"


def test_every_weight_moves_after_one_step(tmp_path):
    trainer = Trainer(tiny_config(), tmp_path, progress=False)
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    trainer.raw_model.train()
    trainer.train_step(0)
    after = trainer.raw_model.state_dict()
    frozen = [k for k in before if "attn.bias" not in k and torch.equal(before[k], after[k])]
    assert frozen == [], f"parameters that did not move: {frozen}"
    c_attn = "transformer.h.0.attn.c_attn.weight"  # q, k and v columns all move
    d = trainer.raw_model.config.n_embd
    delta = (after[c_attn] - before[c_attn]).abs()
    assert all(delta[:, i * d:(i + 1) * d].sum() > 0 for i in range(3))


def test_trimmed_batches_change_no_loss_metric_or_gradient(tmp_path):
    """The trainer cuts each batch after its longest row: causal attention and trailing padding make that exact."""
    from factlens.bios.metrics import attribute_accuracy, attribute_loss, value_nll

    trainer = Trainer(tiny_config(seq_len=128), tmp_path, progress=False)
    model = trainer.raw_model.eval()
    full = trainer.stream.batch(2)
    short = full.trimmed()
    assert short.tokens.shape[1] < full.tokens.shape[1] and short.tokens.shape[1] % 8 == 0
    assert torch.equal(short.tokens, full.tokens[:, : short.tokens.shape[1]])
    assert not full.attention_mask[:, short.tokens.shape[1]:].any()  # only padding was cut
    lf, ls = model(full.tokens).logits, model(short.tokens).logits
    n = short.tokens.shape[1]
    torch.testing.assert_close(ls, lf[:, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(value_nll(ls, short), value_nll(lf, full), rtol=1e-5, atol=1e-5)
    assert float(attribute_accuracy(ls, short)) == float(attribute_accuracy(lf, full))
    grads = []
    for b in (full, short):
        model.zero_grad()
        attribute_loss(model(b.tokens).logits, b).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    assert full.trimmed(multiple=full.tokens.shape[1]) is full  # never longer than the batch


def test_trainer_receives_the_task(tmp_path):
    """The data side is one BiosTask built from the config alone; a trainer given it uses exactly it."""
    from factlens.bios.task import BiosTask

    config = tiny_config()
    task = BiosTask.build(config)
    trainer = Trainer(config, tmp_path, progress=False, task=task)
    assert trainer.stream is task.stream and trainer.population is task.population
    assert list(task.eval_sets) == ["", "unseen_"] and sum(len(b) for b in task.eval_sets[""]) == 16
    fresh = BiosTask.build(config).stream.batch(3)
    assert torch.equal(trainer.stream.batch(3).tokens, fresh.tokens)  # a pure function of the config
    assert not any(tmp_path.iterdir()), "building a trainer wrote into its run directory"


def test_config_errors(tmp_path):
    with pytest.raises(factlens.ConfigError, match="n_positions"):
        Trainer(tiny_config(model=dict(n_positions=16)), tmp_path)
    with pytest.raises(factlens.ConfigError, match="unknown preset"):
        TrainConfig.preset("huge")
    with pytest.raises(factlens.ConfigError, match=r"unknown sampler .zipfian.; pass one of"):
        Trainer(tiny_config(sampler={"kind": "zipfian"}), tmp_path)


def test_opt_architecture_trains(tmp_path):
    history = train(tiny_config(arch="opt", steps=10), tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "checkpoints" / "step_0000010").architecture["model_type"] == "opt"
    assert len(history.evals) == 2


_WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_bios_train import tiny_config
    import torch
    from factlens.bios.trainer import train
    torch.set_num_threads(1)
    train(tiny_config(steps=40, resume_every=5), {out!r}, progress=False)
""")


@pytest.mark.slow  # training subprocesses killed and resumed: .ci/run runs it in its slow step
def test_resume_after_sigkill_gives_identical_losses(tmp_path):
    from factlens.threads import use_threads

    reference = tmp_path / "uninterrupted"
    with use_threads(1):  # the killed worker's thread count: CPU sums in the same order
        train(tiny_config(steps=40, resume_every=5), reference, progress=False)

    killed = tmp_path / "killed"
    script = _WORKER.format(tests=str(Path(__file__).parent), out=str(killed))
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": "0"})
    deadline = time.time() + 120
    while time.time() < deadline and not list_checkpoints(killed / "resume"):
        time.sleep(0.05)
    while time.time() < deadline and max(list_checkpoints(killed / "resume"), default=0) < 10 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = max(list_checkpoints(killed / "resume"))
    assert interrupted_at < 40, "the worker finished before it could be killed; the test proves nothing"

    # the killed trainer's lock is released by the kernel: the resume takes it over
    with use_threads(1):
        train(tiny_config(steps=40, resume_every=5), killed, progress=False)  # resumes
    assert train_losses(killed) == train_losses(reference)
    timing = ("tokens_per_s", "rss_gib", "peak_rss_gib", "threads")
    rows = [{k: v for k, v in json.loads(ln).items() if k not in timing}
            for ln in (killed / "metrics.jsonl").read_text().splitlines()]
    expected = [{k: v for k, v in json.loads(ln).items() if k not in timing}
                for ln in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [(r["kind"], r["step"]) for r in expected]  # none lost or doubled
    assert [r for r in rows if r["kind"] == "train"] == [r for r in expected if r["kind"] == "train"]
    # evaluation rows written by the killed process: another interpreter, whose BLAS once rounded an evaluation
    # sum differently in the 5th digit; a row from other weights or another step differs by far more
    for ours, ref in zip((r for r in rows if r["kind"] == "eval"), (r for r in expected if r["kind"] == "eval")):
        assert {k: v for k, v in ours.items() if k != "kind"} == pytest.approx(
            {k: v for k, v in ref.items() if k != "kind"}, rel=1e-4)
    assert len(list_checkpoints(killed / "resume")) <= 2  # keep_resume
    a = load_checkpoint(killed / "checkpoints" / "step_0000040").state
    b = load_checkpoint(reference / "checkpoints" / "step_0000040").state
    assert all(torch.equal(a[k], b[k]) for k in a)


_DDP = textwrap.dedent("""
    import sys, json, torch
    sys.path.insert(0, {tests!r})
    from test_bios_train import tiny_config
    from factlens.bios.trainer import Trainer
    trainer = Trainer(tiny_config(batch_size=8), {out!r}, progress=False, device="cpu")
    trainer.raw_model.train()
    losses = [float(trainer.train_step(s)) for s in range(3)]
    flat = torch.cat([p.detach().flatten() for p in trainer.raw_model.parameters()])
    if trainer.rank == 0:
        torch.save(flat, {out!r} + "/params.pt")
""")


@pytest.mark.slow  # two DDP subprocesses: .ci/run runs it in its slow step
def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    single = Trainer(tiny_config(batch_size=8), tmp_path / "single", progress=False, device="cpu")
    single.raw_model.train()
    for step in range(3):
        single.train_step(step)
    expected = torch.cat([p.detach().flatten() for p in single.raw_model.parameters()])

    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "ddp_worker.py"
    script.write_text(_DDP.format(tests=str(Path(__file__).parent), out=str(out)))
    torchrun(script)
    got = torch.load(out / "params.pt", weights_only=True)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_history_plateau_end(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"kind": "eval", "step": 0, "attr_loss": 40.0, "attr_acc": 0.0},
        {"kind": "eval", "step": 100, "attr_loss": 7.0, "attr_acc": 0.0},
        {"kind": "eval", "step": 200, "attr_loss": 6.9, "attr_acc": 0.0},
        {"kind": "eval", "step": 300, "attr_loss": 6.0, "attr_acc": 0.1},
        {"kind": "train", "step": 300, "loss": 1.0, "lr": 1e-4, "tokens_per_s": 1.0}]))
    history = Run(tmp_path).history
    assert history.baseline == pytest.approx(6.785, abs=1e-3)
    assert history.plateau_end() == 300
    assert history.plateau_end(ratio=0.5) is None


@pytest.mark.slow  # > 20 s: run by .ci/run in its own step
def test_finetune_on_new_people_with_replay(tmp_path):
    from factlens.bios.finetune import finetune_config

    pre = tmp_path / "pre"
    train(tiny_config(steps=20, lr=3e-3), pre, progress=False)
    config = finetune_config(pre, n_new=16, old_weight=0.5, steps=10, lr=1e-3, checkpoint_every=5)
    trainer = Trainer(config, tmp_path / "ft", progress=False)
    pre_state = load_checkpoint(pre / "checkpoints" / "step_0000020").state
    assert all(torch.equal(v, trainer.raw_model.state_dict()[k]) for k, v in pre_state.items())
    assert len(trainer.population) == 48 + 16
    history = trainer.run()
    assert {"old_attr_loss", "old_attr_acc", "new_attr_loss", "new_attr_acc"} <= set(history.evals.columns)
    lrs = history.train["lr"].unique()
    assert len(lrs) == 1 and lrs[0] == pytest.approx(1e-3)  # constant learning rate
    people = torch.cat([trainer.stream.batch(s).people for s in range(20)])
    assert (people >= 48).any() and (people < 48).any()  # new people and replayed old people
