"""The §4 reproduction (hallucination, finetune, toy): every stage runs, resumes without recomputing, reports."""

from __future__ import annotations

import dataclasses
import json

import pytest

from factlens.bios.reproduce_forgetting import FORGETTING_SCALES, reproduce_forgetting
from factlens.cli import main
from factlens.errors import ConfigError


@pytest.mark.slow
def test_reproduce_forgetting_tiny_runs_every_stage_and_resumes(tmp_path):
    result = reproduce_forgetting("tiny", tmp_path, progress=False)
    sc = FORGETTING_SCALES["tiny"]
    assert len(result.trained) == 1 + len(sc.cells()) + 1  # base run, fine-tuning cells, toy
    assert set(result.hallucination["people"]) == {"seen", "unseen"}
    assert len(result.finetune) == len(sc.cells())
    assert set(result.drift.tv["layer"]) == {0, 1}
    summary = json.loads((tmp_path / "forgetting_summary.json").read_text())
    assert summary["finetune"][0]["old_acc_start"] == result.finetune["old_acc_start"].iloc[0]
    assert "Toy associative memory" in (tmp_path / "forgetting_report.html").read_text()
    again = reproduce_forgetting("tiny", tmp_path, progress=False)
    assert again.trained == [] and again.finetune.equals(result.finetune)
    assert main(["bios", "reproduce", "--scale", "tiny", "--stages", "toy", "finetune", "--out", str(tmp_path),
                 "--report-only", "--quiet"]) == 0


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
    final old accuracy is higher."""
    scale = dataclasses.replace(FORGETTING_SCALES["cpu"], new_sizes=(20,), replay_weights=(1 / 16,),
                                checkpoint_every=5, drift_sequences=16)
    result = reproduce_forgetting(scale, tmp_path, stages=("finetune",), progress=False)
    ft = result.finetune.set_index(["new_people", "replay_weight"])
    plain, replay = ft.loc[(20, 0.0)], ft.loc[(20, 1 / 16)]
    assert 0 < plain["early_step"] <= scale.steps / 10
    assert plain["old_acc_early"] <= plain["old_acc_start"] / 2
    assert plain["new_acc_early"] > plain["new_acc_start"]
    assert replay["old_acc_end"] > plain["old_acc_end"]
