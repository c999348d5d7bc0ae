"""The patching grid (resumable, table + heat-map) and the command line."""

from __future__ import annotations

import json
import shutil

import pytest

import factlens
from factlens.bios.patching.grid import run_grid
from factlens.bios.trainer import train
from factlens.cli import main
from test_bios_train import tiny_config


def test_grid_runs_every_cell_and_resumes(tmp_path):
    config = tiny_config(steps=10, checkpoint_every=5)
    result = run_grid(config, tmp_path, reference_steps=[0, 5], start_steps=[0], include_freeze=True, progress=False)
    cells = set(zip(result.table["reference_step"], result.table["start_patching"]))
    assert cells == {(0, 0), (5, 0), (5, 5)}
    assert (tmp_path / "grid.csv").exists() and (tmp_path / "grid.html").exists()
    assert result.pivot().shape == (2, 2)
    stamp = (tmp_path / "ref5_start0" / "metrics.jsonl").stat().st_mtime
    again = run_grid(config, tmp_path, reference_steps=[0, 5], start_steps=[0], include_freeze=True, progress=False)
    assert (tmp_path / "ref5_start0" / "metrics.jsonl").stat().st_mtime == stamp  # finished cells are skipped
    assert again.table["attr_loss"].tolist() == result.table["attr_loss"].tolist()
    with pytest.raises(factlens.ConfigError, match="schedule"):
        run_grid(config, tmp_path, reference_steps=[3])


@pytest.mark.slow  # train, plot, eval and patch through the CLI (9-14 s): .ci/run runs it in its slow step
def test_cli_train_plot_eval_patch(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["bios", "train", "--preset", "tiny", "--steps", "10", "--people", "64", "--out", str(out), "--quiet"]) == 0
    assert (out / "curves.html").exists() and "baseline" in capsys.readouterr().out
    assert main(["bios", "plot", "--run", str(out)]) == 0
    assert main(["bios", "eval", "--run", str(out), "--step", "10"]) == 0
    record = json.loads(capsys.readouterr().out.split("figure")[-1].split("\n", 1)[1])
    assert record["step"] == 10 and 0 <= record["attr_acc"] <= 1
    patched = tmp_path / "patched"
    # no --preset: the patched run takes the reference run's config (here: tiny with 64 people and 10 steps)
    assert main(["bios", "patch", "--reference", str(out), "--reference-step", "10", "--start", "0",
                 "--out", str(patched), "--quiet"]) == 0
    patched_config = json.loads((patched / "config.json").read_text())
    assert patched_config.pop("patch")["reference_step"] == 10
    reference_config = json.loads((out / "config.json").read_text())
    assert reference_config.pop("patch") is None and patched_config == reference_config
    capsys.readouterr()
    # a start the run never reaches is refused before anything is written
    assert main(["bios", "patch", "--reference", str(out), "--reference-step", "10", "--start", "10",
                 "--out", str(tmp_path / "late"), "--quiet"]) == 2
    assert "start_patching=10" in capsys.readouterr().err and not (tmp_path / "late").exists()
    # a patched run is no grid reference
    assert main(["bios", "grid", "--reference", str(patched), "--reference-steps", "10", "--out",
                 str(tmp_path / "g"), "--quiet"]) == 2
    assert "itself trained with patched attention" in capsys.readouterr().err
    assert main(["bios", "attention", "--run", str(out), "--sequences", "8", "--quiet", "--sharpness"]) == 0
    assert (out / "attention_to_name.html").exists() and (out / "attention_sharpness.csv").exists()


def test_grid_reuses_an_existing_reference_run_and_freezes_only_when_asked(tmp_path, capsys):
    ref = tmp_path / "ref"
    train(tiny_config(steps=4, checkpoint_every=2, log_every=2, resume_every=2), ref, progress=False)
    before = {p: p.stat().st_mtime_ns for p in ref.rglob("*")}
    grid = tmp_path / "grid"
    assert main(["bios", "grid", "--reference", str(ref), "--reference-steps", "2", "4", "--starts", "0",
                 "--out", str(grid), "--quiet"]) == 0
    assert not (grid / "reference").exists()  # the reference was reused, not trained again
    assert {p: p.stat().st_mtime_ns for p in ref.rglob("*")} == before  # and only read
    assert sorted(p.name for p in grid.iterdir() if p.is_dir()) == ["ref2_start0", "ref4_start0"]  # no freeze
    cell = json.loads((grid / "ref2_start0" / "config.json").read_text())
    assert cell["patch"]["reference"] == str(ref) and cell["steps"] == 4
    result = run_grid(None, grid, reference=ref, reference_steps=[2, 4], include_freeze=True, progress=False)
    assert set(zip(result.table["reference_step"], result.table["start_patching"])) == {
        (2, 0), (2, 2), (4, 0), (4, 4)}
    assert result.unpatched["run_dir"] == str(ref)
    # a grid whose settings differ from the reference run's is refused, naming the fields
    capsys.readouterr()
    assert main(["bios", "grid", "--reference", str(ref), "--steps", "8", "--reference-steps", "2",
                 "--out", str(tmp_path / "other"), "--quiet"]) == 2
    assert "differs from the reference run's in ['steps']" in capsys.readouterr().err
    # a reference run that has not finished is refused until it has
    partial = tmp_path / "partial"
    shutil.copytree(ref, partial)
    shutil.rmtree(partial / "checkpoints" / "step_0000004")
    with pytest.raises(factlens.CheckpointError, match=r"reached step 2 of 4.*let it finish"):
        run_grid(None, tmp_path / "g2", reference=partial, reference_steps=[2], progress=False)
    with pytest.raises(factlens.ConfigError, match=r"start steps \[4\].*0\.\.3"):
        run_grid(None, tmp_path / "g3", reference=ref, reference_steps=[2], start_steps=[4], progress=False)
    with pytest.raises(factlens.ConfigError, match=r"reference steps \[3\] are not saved.*\[0, 2, 4\]"):
        run_grid(None, tmp_path / "g4", reference=ref, reference_steps=[3], progress=False)
    with pytest.raises(factlens.ConfigError, match=r"out_dir is the reference run.*write the grid elsewhere"):
        run_grid(None, ref, reference=ref, reference_steps=[2], progress=False)
    assert not any((tmp_path / g).exists() for g in ("other", "g2", "g3", "g4"))


@pytest.mark.slow  # > 20 s: run by .ci/run in its own step
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
