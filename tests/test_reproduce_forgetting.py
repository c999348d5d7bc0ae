"""The §4 reproduction (hallucination, finetune, toy): every stage runs, resumes without recomputing, reports."""

from __future__ import annotations

import dataclasses
import json

import pytest

import factlens.bios.reproduce_forgetting as rf
from factlens.bios.config import TrainConfig
from factlens.bios.finetune import finetune_config
from factlens.bios.reproduce_forgetting import FORGETTING_SCALES, reproduce_forgetting
from factlens.cli import main
from factlens.errors import ConfigError


@pytest.mark.slow
def test_reproduce_forgetting_tiny_runs_every_stage_and_resumes(tmp_path):
    result = reproduce_forgetting("tiny", tmp_path, progress=False)
    sc = FORGETTING_SCALES["tiny"]
    assert len(result.trained) == 1 + 1 + len(sc.all_cells()) + 1 + 1  # base runs, fine-tuning cells, rare, toy
    assert list(result.rare["celebrities"]) == [16] and "rare" in result.figures()
    assert set(result.hallucination["people"]) == {"seen", "unseen"}
    assert len(result.finetune) == len(sc.all_cells())
    assert list(result.finetune["optimizer"]) == ["fresh"] * len(sc.cells()) + ["pre-training"] * len(sc.keep_optimizer)
    assert set(result.drift.tv["layer"]) == {0, 1}
    summary = json.loads((tmp_path / "forgetting_summary.json").read_text())
    assert summary["finetune"][0]["old_acc_start"] == result.finetune["old_acc_start"].iloc[0]
    assert "Toy associative memory" in (tmp_path / "forgetting_report.html").read_text()
    again = reproduce_forgetting("tiny", tmp_path, progress=False)
    assert again.trained == [] and again.finetune.equals(result.finetune)
    assert main(["bios", "reproduce", "--scale", "tiny", "--stages", "toy", "finetune", "--out", str(tmp_path),
                 "--report-only", "--quiet"]) == 0


def test_forgetting_stages_run_their_cells_through_the_executor_and_never_retrain_a_finished_one(tmp_path,
                                                                                                 monkeypatch):
    scale = dataclasses.replace(FORGETTING_SCALES["tiny"], overrides=dict(steps=10, n_unseen=8, checkpoint_every=5),
                                new_sizes=(4,), replay_weights=(0.5,), steps=4, checkpoint_every=2, rare=None,
                                keep_optimizer=())
    calls = []

    def recording(cells, executor=None, **kw):
        calls.append([(c.key, c.fingerprint, c.run_dir) for c in cells])
        report = run_cells(cells, executor, **kw)
        calls[-1].append(report.submitted)
        return report

    run_cells = rf.run_cells
    monkeypatch.setattr(rf, "run_cells", recording)
    first = reproduce_forgetting(scale, tmp_path, stages=("hallucination", "finetune"), progress=False)
    base_dir = tmp_path / "hallucination" / "base"
    base = rf.Cell("base", TrainConfig.preset("tiny", steps=10, n_unseen=8, checkpoint_every=5), "")
    tuned = {f"finetune/new4_w{w:g}": finetune_config(base_dir, n_new=4, old_weight=w, steps=4, lr=scale.lr,
                                                      checkpoint_every=2) for w in (0.0, 0.5)}
    assert calls == [[("hallucination/base", base.fingerprint, str(base_dir)), ["hallucination/base"]],
                     [*[(k, rf.Cell(k, c, "").fingerprint, str(tmp_path / k)) for k, c in tuned.items()],
                      list(tuned)]]
    assert first.trained == ["hallucination/base", *tuned] and first.missing == [] and len(first.finetune) == 2
    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and "report" not in p.name
               and "summary" not in p.name}
    calls.clear()
    again = reproduce_forgetting(scale, tmp_path, stages=("hallucination", "finetune"), progress=False)
    assert [c[-1] for c in calls] == [[], []] and again.trained == [] and again.finetune.equals(first.finetune)
    assert {p: p.stat().st_mtime_ns for p in written} == written  # finished cells are read, not retrained


def test_a_failing_forgetting_cell_is_reported_and_the_others_go_on(tmp_path, monkeypatch):
    import factlens.bios.executor as executor

    scale = dataclasses.replace(FORGETTING_SCALES["tiny"], overrides=dict(steps=10, n_unseen=8, checkpoint_every=5),
                                new_sizes=(4,), replay_weights=(0.5,), steps=4, checkpoint_every=2, rare=None,
                                keep_optimizer=())
    real = executor.run_cell

    def failing(cell, **kw):
        if cell.key == "finetune/new4_w0.5":
            raise RuntimeError("out of memory in the replay cell")
        return real(cell, **kw)

    monkeypatch.setattr(executor, "run_cell", failing)
    result = reproduce_forgetting(scale, tmp_path, stages=("finetune",), progress=False)
    assert [s.cell.key for s in result.cells.failed] == ["finetune/new4_w0.5"]
    assert result.missing == ["finetune/new4_w0.5"] and list(result.finetune["replay_weight"]) == [0.0]
    summary = json.loads((tmp_path / "forgetting_summary.json").read_text())
    assert [f["cell"] for f in summary["failed"]] == ["finetune/new4_w0.5"]
    assert "out of memory in the replay cell" in summary["failed"][0]["error"]
    assert "out of memory in the replay cell" in (tmp_path / "forgetting_report.html").read_text()


def test_rare_cells_fine_tune_a_celebrity_run_on_its_own_non_celebrities(tmp_path):
    """Fig. P: ``rare/base`` is the base config with the celebrity sampler; ``rare/finetune`` starts from its
    exact last weights, trains on people n_celebrities..N-1 only (already seen: no new people) and evaluates the
    celebrities as old people."""
    import torch

    from factlens.bios.finetune import pretraining_run
    from factlens.bios.run import Run

    scale = dataclasses.replace(FORGETTING_SCALES["tiny"], overrides=dict(steps=10, n_unseen=8, checkpoint_every=5),
                                new_sizes=(4,), replay_weights=(), steps=4, checkpoint_every=2, rare=(0.25, 4),
                                keep_optimizer=())
    result = reproduce_forgetting(scale, tmp_path, stages=("finetune",), progress=False)
    base = TrainConfig.preset("tiny", steps=10, n_unseen=8, checkpoint_every=5)
    rare_base = Run(tmp_path / "rare" / "base")
    assert rare_base.config.sampler == {"kind": "celebrities", "n_celebrities": 16, "weight": 4}
    assert dataclasses.replace(rare_base.config, sampler=base.sampler) == base
    tuned = Run(tmp_path / "rare" / "finetune").config
    assert tuned.finetune.seen_from == 16 and tuned.finetune.old_weight == 0.0
    assert pretraining_run(tuned).path == rare_base.path
    assert tuned.finetune.init_from == str(rare_base.checkpoint_dir(10))
    row = result.rare.iloc[0]
    assert (row["celebrities"], row["non_celebrities"], row["celebrity_weight"]) == (16, 48, 4)
    ev = result.histories["rare"].evals
    assert row["new_acc_end"] == ev["new_attr_acc"].iloc[-1] and row["old_acc_start"] == ev["old_attr_acc"].iloc[0]
    model = Run(tmp_path / "rare" / "finetune").checkpoint(0)
    start = Run(tmp_path / "rare" / "base").checkpoint(10)
    assert model.state.keys() == start.state.keys()
    for (name, a), b in zip(model.state.items(), start.state.values(), strict=True):
        assert torch.equal(a, b), name  # fine-tuning starts from the exact pre-trained weights
    assert "Fine-tuning on rare, already-seen people" in (tmp_path / "forgetting_report.html").read_text()
    assert json.loads((tmp_path / "forgetting_summary.json").read_text())["rare"][0]["celebrities"] == 16


def test_kept_optimizer_cells_carry_the_pretraining_adamw_state(tmp_path):
    """A ``_keep`` cell is its fresh twin with the base run's AdamW state at the last step: same people, same
    start weights, same first batch, and a different update from the second step on."""
    import torch

    from factlens.bios.run import Run

    scale = dataclasses.replace(FORGETTING_SCALES["tiny"], overrides=dict(steps=10, n_unseen=8, checkpoint_every=5),
                                new_sizes=(4,), replay_weights=(), steps=4, checkpoint_every=2, rare=None,
                                keep_optimizer=((4, 0.0),))
    result = reproduce_forgetting(scale, tmp_path, stages=("finetune",), progress=False)
    assert list(result.finetune["optimizer"]) == ["fresh", "pre-training"]
    fresh, kept = Run(tmp_path / "finetune" / "new4_w0"), Run(tmp_path / "finetune" / "new4_w0_keep")
    assert kept.config.finetune.keep_optimizer and not fresh.config.finetune.keep_optimizer
    assert dataclasses.replace(kept.config.finetune, keep_optimizer=False) == fresh.config.finetune
    start = Run(tmp_path / "hallucination" / "base").checkpoint(10).state
    for run in (fresh, kept):
        assert all(torch.equal(a, start[k]) for k, a in run.checkpoint(0).state.items())
    moved = [not torch.equal(a, kept.checkpoint(2).state[k]) for k, a in fresh.checkpoint(2).state.items()]
    assert any(moved), "the carried AdamW state changed no update"
    assert "new4_w0_keep" in result.histories and rf.cell_name(4, 0.0, True) == "new4_w0_keep"
    fig = result.figures()["optimizer"]
    assert [t.name for t in fig.data] == ["new4_w0: fresh AdamW", "new4_w0: pre-training AdamW"]
    assert list(fig.data[1].y) == list(result.histories["new4_w0_keep"].evals["old_attr_acc"])
    assert "Optimizer state" in (tmp_path / "forgetting_report.html").read_text()


def test_unknown_stage_or_scale_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown stages"):
        reproduce_forgetting("tiny", tmp_path, stages=("hallucinations",))
    with pytest.raises(ConfigError, match="unknown scale"):
        reproduce_forgetting("huge", tmp_path)


def test_report_only_computes_nothing(tmp_path):
    result = reproduce_forgetting("tiny", tmp_path, train_missing=False, progress=False)
    assert result.trained == [] and "hallucination/base" in result.missing and "toy" in result.missing
    assert not list(tmp_path.rglob("metrics.jsonl"))


@pytest.mark.slow
def test_cpu_scale_forgetting_is_fast_and_replay_limits_it(tmp_path):
    """The cpu scale's pre-training run and two of its fine-tuning cells (the reproduction's configs, evaluated
    every 5 steps instead of 10; evaluation changes no training step): without replay, old-people accuracy falls
    by at least half within the first tenth of fine-tuning while new-people accuracy rises; with replay, the
    final old accuracy is higher; carrying the pre-training AdamW state over forgets faster and deeper;
    fine-tuning on rare, already-seen people (Fig. P) causes no such fall."""
    scale = dataclasses.replace(FORGETTING_SCALES["cpu"], new_sizes=(20,), replay_weights=(1 / 16,),
                                checkpoint_every=5, drift_sequences=16, keep_optimizer=((20, 0.0),))
    result = reproduce_forgetting(scale, tmp_path, stages=("finetune",), progress=False)
    ft = result.finetune.set_index(["new_people", "replay_weight", "optimizer"])
    plain, replay = ft.loc[(20, 0.0, "fresh")], ft.loc[(20, 1 / 16, "fresh")]
    kept = ft.loc[(20, 0.0, "pre-training")]
    assert 0 < plain["early_step"] <= scale.steps / 10
    assert plain["old_acc_early"] <= plain["old_acc_start"] / 2
    assert plain["new_acc_early"] > plain["new_acc_start"]
    assert replay["old_acc_end"] > plain["old_acc_end"]
    # the pre-training AdamW state (small second moments) takes larger first steps: faster, deeper forgetting
    assert kept["old_acc_early"] < plain["old_acc_early"] and kept["old_acc_end"] < plain["old_acc_end"]
    # Fig. P: fine-tuning the celebrity run on its own rare, already-seen people raises their accuracy without
    # the collapse that new people cause in the celebrities' (the old people's) accuracy
    rare = result.rare.iloc[0]
    assert rare["new_acc_end"] > rare["new_acc_start"]
    assert rare["old_acc_early"] >= 0.9 * rare["old_acc_start"] and rare["old_acc_end"] >= 0.8 * rare["old_acc_start"]
