"""`factlens bios reproduce` in its tiny scale: every stage runs, the report is written, a resume retrains nothing."""

from __future__ import annotations

import json
import math
import shutil

import pytest

import factlens
from factlens.bios.reproduce import SCALES, Scale, fit_power_law, reproduce
from factlens.cli import main


def _mtimes(root):
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("metrics.jsonl")}


@pytest.mark.slow  # > 20 s: run by .ci/run in its own step
def test_reproduce_tiny_runs_every_stage_and_resumes(tmp_path):
    sc = SCALES["tiny"]
    result = reproduce("tiny", tmp_path, progress=False, write_png=False)
    # every stage trained its cells: 4 populations, 5 references (+ frozen variants), 2 alphas
    steps = sc.config(sc.patch_people).steps
    n_patch = sum(len({0, r} if sc.freeze else {0}) for r in sc.reference_steps)
    n_patch -= int(sc.freeze and steps in sc.reference_steps)  # frozen at the last step is the control itself
    assert len(result.trained) == len(sc.populations) + n_patch + len(sc.alphas)
    assert result.scaling["n_people"].tolist() == list(sc.populations)
    assert sorted(result.patching["reference_step"].unique()) == sorted(sc.reference_steps)
    assert result.curriculum["sampler"].tolist() == ["uniform"] + ["power_law"] * len(sc.alphas)
    assert set(result.patching_table().columns) == set(sc.reference_steps)
    html = result.report.read_text()
    for heading in ("Plateau vs population", "Attention patching", "Curriculum", "0.43"):
        assert heading in html
    assert "PNG export not requested" in html
    assert "Smoke run." in html and "SMOKE RUN" in repr(result)  # a tiny run says what it is
    assert "≈ nan" not in html and "<sup>nan" not in html and "nan" not in result.fit_text()  # never a NaN fit
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["scaling"]) == len(sc.populations)

    before = _mtimes(tmp_path)
    again = reproduce("tiny", tmp_path, progress=False, write_png=False)
    assert again.trained == []                      # nothing retrained ...
    assert _mtimes(tmp_path) == before              # ... and no run directory touched
    assert again.patching["final_loss"].tolist() == result.patching["final_loss"].tolist()

    shutil.rmtree(tmp_path / "curriculum" / "alpha0.8")   # a lost cell is the only one retrained
    assert reproduce("tiny", tmp_path, progress=False, write_png=False).trained == ["curriculum/alpha0.8"]


def test_fit_power_law_recovers_the_exponent_and_skips_missing_points():
    n = [250, 500, 1000, 2000]
    fit = fit_power_law([*n, 4000], [*(3 * x ** 0.7 for x in n), None])
    assert math.isclose(fit["exponent"], 0.7, rel_tol=1e-9) and math.isclose(fit["coef"], 3, rel_tol=1e-9)
    assert fit["n_points"] == 4
    assert math.isnan(fit_power_law([1, 2], [5, None])["exponent"])


def test_scale_checks_name_the_fix(tmp_path):
    with pytest.raises(factlens.ConfigError, match="choose one of"):
        reproduce("huge", tmp_path)
    bad = Scale(**{**SCALES["tiny"].__dict__, "patch_people": 999})
    with pytest.raises(factlens.ConfigError, match="add them to populations"):
        reproduce(bad, tmp_path)
    off = Scale(**{**SCALES["tiny"].__dict__, "reference_steps": (0, 4)})
    with pytest.raises(factlens.ConfigError, match="checkpoint schedule"):
        reproduce(off, tmp_path)


def test_cli_reproduce_report_only_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTLENS_TRACEBACK", "1")
    with pytest.raises(factlens.ConfigError, match="not finished"):
        main(["bios", "reproduce", "--scale", "tiny", "--out", str(tmp_path), "--report-only", "--no-png"])
    assert not list(tmp_path.rglob("metrics.jsonl"))


@pytest.mark.parametrize("name", sorted(SCALES))
def test_every_scale_is_a_valid_experiment(name):
    """>= 4 populations spanning >= 8x, >= 5 references from step 0 on the checkpoint schedule, and the patching
    and curriculum populations among the swept ones (so their scaling runs are the controls)."""
    sc = SCALES[name]
    assert len(sc.populations) >= 4 and max(sc.populations) >= 8 * min(sc.populations)
    assert sc.patch_people in sc.populations and sc.curriculum_people in sc.populations
    cfg = sc.config(sc.patch_people)
    assert 0 in sc.reference_steps and len(sc.reference_steps) >= 5
    assert set(sc.reference_steps) <= set(cfg.checkpoint_steps()) and sc.early_step in cfg.checkpoint_steps()
    assert len({sc.config(n).steps for n in sc.populations}) == 1  # one schedule for every population
