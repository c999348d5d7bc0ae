"""Template diversity and sentence order (Zucchet et al. Fig. A), and the robustness options of the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import factlens
from factlens.bios.config import TrainConfig
from factlens.bios.data.population import Population
from factlens.bios.run import Run
from factlens.bios.task import BiosTask
from factlens.bios.trainer import train
from factlens.cli import main

POOLS = dict(first_names=20, last_names=20, cities=10, universities=10, majors=10, companies=10, years=2)


def config(**overrides) -> TrainConfig:
    base = dict(n_people=32, steps=4, checkpoint_every=2, resume_every=2, n_eval_sequences=16, n_unseen=0,
                pools=POOLS, eval_batch_size=16)
    return TrainConfig.preset("tiny", **{**base, **overrides})


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
def test_training_batches_draw_only_the_persons_allowed_templates(k):
    task = BiosTask.build(config(n_train_templates=k))
    allowed = task.population.train_templates  # [n, 6, k]
    assert allowed.shape[-1] == k
    for step in range(20):
        choices = task.stream.choices(step)
        for person, templates in zip(choices.people, choices.templates, strict=True):
            for attr in range(6):
                assert templates[attr] in allowed[person, attr]
    # evaluation draws only held-out templates, never a training one
    for batch in task.eval_sets[""]:
        for person, templates in zip(batch.people.tolist(), batch.templates.tolist(), strict=True):
            assert not any(templates[a] in allowed[person, a] for a in range(6))


def test_fewer_templates_keep_the_held_out_split_and_a_subset_of_the_training_templates():
    full = Population.generate(200, seed=3)
    for k in (1, 2, 4, 8, 16):
        fewer = Population.generate(200, seed=3, n_train_templates=k)
        assert np.array_equal(fewer.eval_templates, full.eval_templates)
        assert np.array_equal(fewer.names, full.names) and np.array_equal(fewer.values, full.values)
        inside = (fewer.train_templates[..., :, None] == full.train_templates[..., None, :]).any(-1)
        assert inside.all()
        assert fewer.fingerprint() != full.fingerprint()


def test_fixed_order_gives_one_attribute_order_and_random_order_many():
    fixed = BiosTask.build(config(sentence_order="fixed", batch_size=32))
    shuffled = BiosTask.build(config(batch_size=32))
    for step in range(5):
        batch = fixed.stream.batch(step)
        assert (batch.value_start.diff(dim=1) > 0).all()  # the values come in attribute order
        assert (fixed.stream.choices(step).order == np.arange(6)).all()
    orders = {tuple(o) for step in range(5) for o in shuffled.stream.choices(step).order}
    assert len(orders) > 10
    # evaluation keeps the shuffled order: it measures knowledge of the person, not of a position
    starts = torch.cat([b.value_start for b in fixed.eval_sets[""]])
    assert not (starts.diff(dim=1) > 0).all()


def test_split_and_order_are_stored_and_read_back_by_content(tmp_path):
    cfg = config(n_train_templates=4, sentence_order="fixed")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    train(cfg, tmp_path / "run", progress=False)
    run = Run(tmp_path / "run")
    assert run.config.n_train_templates == 4 and run.config.sentence_order == "fixed"
    people = run.population()
    assert people.n_train_templates == 4 and people.equals(cfg.make_population())
    recorded = {c.manifest["extra"]["population_sha256"] for c in run.manifests.values()}
    assert recorded == {people.fingerprint()}
    # a run of another split in the same folder is refused
    with pytest.raises(factlens.FactlensError):
        train(config(n_train_templates=8, sentence_order="fixed"), tmp_path / "run", progress=False)


def test_a_reader_with_another_split_is_refused(tmp_path):
    cfg = config(n_train_templates=2)
    with pytest.raises(factlens.ConfigError, match="n_train_templates=2"):
        BiosTask.build(cfg, Population.generate(32, seed=0, pools=cfg.make_pools(), n_train_templates=4))
    own = cfg.make_population()
    train(cfg, tmp_path / "run", progress=False, population=own)
    assert Run(tmp_path / "run").population().equals(own)
    # the stored people replaced by the same people with another template split: refused by fingerprint
    other = Population.generate(32, seed=0, pools=cfg.make_pools(), n_train_templates=2 + 1)
    other = Population(names=own.names, values=own.values, train_templates=other.train_templates[..., :2],
                       eval_templates=other.eval_templates, pools=own.pools, seed=own.seed)
    other.save(tmp_path / "run" / "population.npz")
    with pytest.raises(factlens.CheckpointError, match="not the ones it was trained on"):
        Run(tmp_path / "run").population()


def test_bad_template_counts_orders_and_model_sizes_are_refused():
    for bad in (0, 25, 2.0, True):
        with pytest.raises(factlens.ConfigError, match="n_train_templates"):
            config(n_train_templates=bad)
    with pytest.raises(factlens.ConfigError, match="sentence_order"):
        config(sentence_order="sorted")
    with pytest.raises(factlens.ConfigError, match="not divisible by n_heads=4"):
        config(model=dict(n_embd=30, n_head=4))
    with pytest.raises(factlens.ConfigError, match="n_layer"):
        config(model=dict(n_layer=0))


@pytest.mark.slow  # runs trained through the CLI (6-7 s): .ci/run runs it in its slow step
def test_cli_sets_templates_order_and_robustness_knobs(tmp_path):
    out = tmp_path / "run"
    argv = ["bios", "train", "--preset", "tiny", "--steps", "2", "--people", "16", "--templates", "2",
            "--sentence-order", "fixed", "--weight-decay", "0.3", "--betas", "0.8", "0.99", "--n-layers", "1",
            "--d-model", "16", "--n-heads", "4", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    cfg = Run(out).config
    assert (cfg.n_train_templates, cfg.sentence_order, cfg.weight_decay, cfg.betas) == (2, "fixed", 0.3, (0.8, 0.99))
    assert (cfg.model["n_layer"], cfg.model["n_embd"], cfg.model["n_head"], cfg.model["n_inner"]) == (1, 16, 4, 64)
    ckpt = Run(out).checkpoint()
    assert ckpt.build_model("cpu").config.n_layer == 1
    for bad in (["--templates", "25"], ["--weight-decay", "-1"], ["--betas", "0.9", "1.5"],
                ["--d-model", "18", "--n-heads", "4"], ["--n-layers", "0"]):
        assert main(["bios", "train", "--preset", "tiny", "--steps", "2", "--people", "16", *bad,
                     "--out", str(tmp_path / "bad"), "--quiet"]) == 2
        assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        main(["bios", "train", "--sentence-order", "sorted", "--out", str(tmp_path / "bad")])


def test_reproduce_takes_the_robustness_knobs():
    from factlens.bios.reproduce import with_overrides

    sc = with_overrides("tiny", {"weight_decay": 0.03, "betas": (0.9, 0.99), "model": {"n_layer": 1}})
    cfg = sc.config(sc.populations[0])
    assert (cfg.weight_decay, cfg.betas, cfg.model["n_layer"], cfg.model["n_embd"]) == (0.03, (0.9, 0.99), 1, 32)
    with pytest.raises(factlens.ConfigError, match="weight_decay"):
        with_overrides("tiny", {"weight_decay": -0.1})
