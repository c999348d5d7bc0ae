"""The patching grid (resumable, table + heat-map) and the command line."""

from __future__ import annotations

import json

import pytest

import factlens
from factlens.cli import main
from factlens.patching.grid import run_grid
from test_bios_train import tiny_config


def test_grid_runs_every_cell_and_resumes(tmp_path):
    config = tiny_config(steps=10, checkpoint_every=5)
    result = run_grid(config, tmp_path, reference_steps=[0, 5], start_steps=[0], progress=False)
    cells = set(zip(result.table["reference_step"], result.table["start_patching"]))
    assert cells == {(0, 0), (5, 0), (5, 5)}
    assert (tmp_path / "grid.csv").exists() and (tmp_path / "grid.html").exists()
    assert result.pivot().shape == (2, 2)
    stamp = (tmp_path / "ref5_start0" / "metrics.jsonl").stat().st_mtime
    again = run_grid(config, tmp_path, reference_steps=[0, 5], start_steps=[0], progress=False)
    assert (tmp_path / "ref5_start0" / "metrics.jsonl").stat().st_mtime == stamp  # finished cells are skipped
    assert again.table["attr_loss"].tolist() == result.table["attr_loss"].tolist()
    with pytest.raises(factlens.ConfigError, match="schedule"):
        run_grid(config, tmp_path, reference_steps=[3])


def test_cli_train_plot_eval_patch(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["bios", "train", "--preset", "tiny", "--steps", "10", "--people", "64", "--out", str(out), "--quiet"]) == 0
    assert (out / "curves.html").exists() and "baseline" in capsys.readouterr().out
    assert main(["bios", "plot", "--run", str(out)]) == 0
    assert main(["bios", "eval", "--run", str(out), "--step", "10"]) == 0
    record = json.loads(capsys.readouterr().out.split("figure")[-1].split("\n", 1)[1])
    assert record["step"] == 10 and 0 <= record["attr_acc"] <= 1
    patched = tmp_path / "patched"
    assert main(["bios", "patch", "--reference", str(out), "--reference-step", "10", "--start", "0",
                 "--same-config", "--out", str(patched), "--quiet"]) == 0
    assert json.loads((patched / "config.json").read_text())["patch"]["reference_step"] == 10
    assert main(["bios", "attention", "--run", str(out), "--sequences", "8", "--quiet"]) == 0
    assert (out / "attention_to_name.html").exists()


def test_cli_capitals_analyze_and_mitigate_offline(tmp_path, capsys):
    assert main(["capitals", "mitigate", "--model", "tiny-opt", "--shots", "0", "--out", str(tmp_path / "m")]) == 0
    assert "(a) + (b)" in (tmp_path / "m" / "mitigation.md").read_text()
    assert main(["capitals", "analyze", "--model", "tiny-gpt2", "--shots", "0", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "report.html").exists()


def test_cli_reports_factlens_errors_without_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FACTLENS_MEMORY_BUDGET", "1MiB")
    assert main(["bios", "train", "--preset", "tiny", "--steps", "2", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("factlens: error: ResourceError:") and "smaller batch_size" in err
    monkeypatch.setenv("FACTLENS_TRACEBACK", "1")
    with pytest.raises(factlens.ResourceError):
        main(["bios", "train", "--preset", "tiny", "--steps", "2", "--out", str(tmp_path / "r"), "--quiet"])
