"""Training cells and their executors without SLURM: settings from files and the command line, cells by content,
the local executor (a failing cell is reported with its error and the others go on; finished cells are read)."""

from __future__ import annotations

import argparse
import json
import os
import pickle

import pytest

import factlens
from factlens.bios.cells import Cell, cell_threads, run_cell
from factlens.bios.executor import ExecutorConfig, run_cells
from factlens.bios.trainer import PatchConfig, train
from factlens.cli.bios import _executor, _executor_args
from factlens.errors import ClusterError
from test_bios_train import tiny_config

TIMING = ("tokens_per_s", "rss_gib", "peak_rss_gib", "wall_s", "step_s", "threads")


def test_executor_settings_from_toml_json_and_the_command_line(tmp_path):
    toml = tmp_path / "cluster.toml"
    toml.write_text('[executor]\nkind = "slurm"\npartition = "gpu"\ngpus_per_job = 1\ntime_min = 240\n'
                    '[executor.sbatch]\naccount = "lab"\n')
    ex = ExecutorConfig.from_file(toml)
    assert (ex.kind, ex.partition, ex.gpus_per_job, ex.time_min, ex.sbatch) == ("slurm", "gpu", 1, 240, {"account": "lab"})
    js = tmp_path / "cluster.json"
    js.write_text(json.dumps({"executor": "slurm", "cpus_per_task": 4, "mem_gb": 16}))
    assert ExecutorConfig.from_file(js) == ExecutorConfig(kind="slurm", cpus_per_task=4, mem_gb=16)

    p = argparse.ArgumentParser()
    _executor_args(p)
    args = p.parse_args(["--executor-config", str(toml), "--time-min", "30", "--sbatch", "qos=high",
                         "--cpus-per-task", "2"])
    ex = _executor(args)  # the command line over the file; sbatch options merged
    assert (ex.kind, ex.partition, ex.time_min, ex.cpus_per_task) == ("slurm", "gpu", 30, 2)
    assert ex.sbatch == {"account": "lab", "qos": "high"}

    with pytest.raises(factlens.ConfigError, match="unknown executor settings"):
        ExecutorConfig.from_dict({"kind": "slurm", "partion": "gpu"})
    with pytest.raises(factlens.ConfigError, match="--executor local"):
        ExecutorConfig(kind="kubernetes")
    with pytest.raises(factlens.ConfigError, match="positive integer"):
        ExecutorConfig(cpus_per_task=0)
    with pytest.raises(factlens.ConfigError, match="KEY=VALUE"):
        _executor(p.parse_args(["--sbatch", "qos"]))
    (tmp_path / "bad.toml").write_text("kind = ")
    with pytest.raises(factlens.ConfigError, match="not valid TOML"):
        ExecutorConfig.from_file(tmp_path / "bad.toml")


def test_a_cell_is_a_picklable_value_identified_by_its_config(tmp_path):
    cell = Cell("N48", tiny_config(), str(tmp_path / "N48"))
    assert pickle.loads(pickle.dumps(cell)) == cell
    assert Cell("elsewhere", tiny_config(), "x").fingerprint == cell.fingerprint  # what, not where
    assert Cell("N48", tiny_config(seed=1), str(tmp_path / "N48")).fingerprint != cell.fingerprint


def test_cell_threads_follow_the_cpus_given(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert cell_threads() == 3
    assert cell_threads(2) == 2


def test_local_cells_go_on_past_a_failure_and_finished_cells_are_read(tmp_path):
    good = Cell("good", tiny_config(steps=4, checkpoint_every=2), str(tmp_path / "good"))
    missing_reference = PatchConfig(reference=str(tmp_path / "no-such-run"), reference_step=0)
    bad = Cell("bad", tiny_config(steps=4, checkpoint_every=2, patch=missing_reference), str(tmp_path / "bad"))
    report = run_cells([bad, good], ExecutorConfig(cpus_per_task=1), jobs_dir=tmp_path / "jobs", progress=False)
    assert [s.state for s in report.statuses] == ["failed", "finished"]
    assert "no-such-run" in report.failed[0].error and "Error" in report.failed[0].error
    assert "bad: failed" in report.failed[0].describe()
    assert good.finished() and run_cell(good)["trained"] is False

    stamp = (tmp_path / "good" / "metrics.jsonl").stat().st_mtime_ns
    collected = run_cells([bad, good], jobs_dir=tmp_path / "jobs", submit=False, progress=False)
    assert [s.state for s in collected.statuses] == ["not started", "finished"]  # --collect trains nothing
    assert (tmp_path / "good" / "metrics.jsonl").stat().st_mtime_ns == stamp


@pytest.mark.slow  # two worker processes train three cells (9-14 s): .ci/run runs it in its slow step
def test_local_workers_train_cells_in_processes_exactly_as_one_after_another(tmp_path):
    """Two worker processes give each cell the metrics of a serial run with the same threads; a failing cell is
    reported with its error (the remote traceback) and the others finish."""
    def cells(root):
        good = [Cell(f"c{i}", tiny_config(steps=4, checkpoint_every=2, seed=i), str(root / f"c{i}")) for i in range(2)]
        missing = PatchConfig(reference=str(root / "no-such-run"), reference_step=0)
        return [*good, Cell("bad", tiny_config(steps=4, checkpoint_every=2, patch=missing), str(root / "bad"))]

    serial = run_cells(cells(tmp_path / "a"), ExecutorConfig(cpus_per_task=1), jobs_dir=tmp_path / "ja",
                       progress=False)
    parallel = run_cells(cells(tmp_path / "b"), ExecutorConfig(cpus_per_task=1, workers=2), jobs_dir=tmp_path / "jb",
                         progress=False)
    assert [s.state for s in parallel.statuses] == [s.state for s in serial.statuses] == ["finished"] * 2 + ["failed"]
    assert "no-such-run" in parallel.failed[0].error
    for i in range(2):
        a = (tmp_path / "a" / f"c{i}" / "metrics.jsonl").read_text().splitlines()
        b = (tmp_path / "b" / f"c{i}" / "metrics.jsonl").read_text().splitlines()
        strip = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in a]
        assert strip == [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in b]
    with pytest.raises(factlens.ConfigError, match="workers"):
        ExecutorConfig(workers=0)


def test_a_cell_whose_folder_holds_another_run_is_refused_before_anything_trains(tmp_path):
    train(tiny_config(steps=2, checkpoint_every=1), tmp_path / "taken", progress=False)
    fresh = Cell("fresh", tiny_config(steps=2), str(tmp_path / "fresh"))
    other = Cell("taken", tiny_config(steps=2, seed=5), str(tmp_path / "taken"))
    with pytest.raises(factlens.CheckpointError, match="another config"):
        run_cells([fresh, other], jobs_dir=tmp_path / "jobs", progress=False)
    assert not (tmp_path / "fresh").exists()


@pytest.mark.slow  # a stage's cells trained through the CLI (9-14 s): .ci/run runs it in its slow step
def test_a_failed_reproduction_cell_is_in_the_report_and_the_other_cells_go_on(tmp_path, monkeypatch, capsys):
    import factlens.bios.executor as executor
    from factlens.bios.reproduce import SCALES, Scale, reproduce

    tiny = SCALES["tiny"]
    small = Scale(preset="tiny", overrides={**tiny.overrides, "steps": 4, "checkpoint_every": 2, "resume_every": 2},
                  populations=(16, 32), patch_people=16, reference_steps=(0, 4), early_step=2, curriculum_people=16,
                  alphas=(0.6, 0.8))
    real = executor.run_cell

    def run_cell(cell, **kw):  # one cell's training raises, as a bug or a bad node would
        if cell.key == "curriculum/alpha0.8":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(cell, **kw)

    monkeypatch.setattr(executor, "run_cell", run_cell)
    result = reproduce(small, tmp_path, progress=False, write_png=False)
    assert result.missing == ["curriculum/alpha0.8"]
    assert len(result.trained) == 2 + 2 + 1  # every other cell trained
    (failed,) = result.cells.failed
    assert "illegal memory access" in failed.error and "RuntimeError" in failed.error
    html = result.report.read_text()
    assert "Failed cells" in html and "curriculum/alpha0.8" in html and "illegal memory access" in html
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [f["cell"] for f in summary["failed"]] == ["curriculum/alpha0.8"]

    from factlens.cli import main

    monkeypatch.setitem(SCALES, "tiny", small)
    capsys.readouterr()
    assert main(["bios", "reproduce", "--scale", "tiny", "--out", str(tmp_path), "--no-png", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "curriculum/alpha0.8: failed" in out and "illegal memory access" in out  # in the command's output


def test_a_submission_slurm_refuses_is_a_factlens_error_and_records_nothing(tmp_path, monkeypatch):
    """sbatch answering with an error (here a stand-in that fails as sbatch does when slurmctld is down) ends in
    a ClusterError quoting SLURM's reason and naming the fix; no job record is written."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Unable to contact slurm "
                      "controller (connect failure)' >&2\nexit 1\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cell = Cell("N48", tiny_config(steps=4, checkpoint_every=2), str(tmp_path / "N48"))
    with pytest.raises(ClusterError, match=r"Unable to contact slurm controller.*sinfo.*--executor local"):
        run_cells([cell], ExecutorConfig(kind="slurm", cpus_per_task=1), jobs_dir=tmp_path / "jobs",
                  progress=False)
    assert not (tmp_path / "jobs" / "jobs.json").exists() and not (tmp_path / "N48").exists()


def test_a_finished_cell_reports_the_job_its_records_name(tmp_path):
    """A cell that finished (here trained locally) is reported with the SLURM job that the records name for its
    fingerprint, and without one when the record belongs to another config."""
    cell = Cell("N48", tiny_config(steps=4, checkpoint_every=2), str(tmp_path / "N48"))
    run_cell(cell, threads=1)
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    record = {"job_id": "77_0", "fingerprint": cell.fingerprint, "folder": str(jobs / "logs" / "%j")}
    (jobs / "jobs.json").write_text(json.dumps({"N48": record}))
    status = run_cells([cell], ExecutorConfig(kind="slurm"), jobs_dir=jobs, submit=False, wait=False,
                       progress=False).statuses[0]
    assert (status.state, status.job_id) == ("finished", "77_0") and status.log.endswith("77_0_0_log.err")
    (jobs / "jobs.json").write_text(json.dumps({"N48": {**record, "fingerprint": "another config"}}))
    status = run_cells([cell], ExecutorConfig(kind="slurm"), jobs_dir=jobs, submit=False, wait=False,
                       progress=False).statuses[0]
    assert (status.state, status.job_id) == ("finished", None)


@pytest.mark.slow
def test_workers_start_from_a_script_without_a_main_guard(tmp_path):
    """Each worker is a fresh interpreter on ``factlens.bios.cell_worker``: the caller's script is not re-run in
    it, so a plain script (or a notebook) with ``workers=2`` trains its cells."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "grid.py"
    script.write_text(textwrap.dedent(f"""
        from factlens.bios.cells import Cell
        from factlens.bios.config import TrainConfig
        from factlens.bios.executor import ExecutorConfig, run_cells
        cells = [Cell(f"c{{i}}", TrainConfig.preset("tiny", steps=2, checkpoint_every=1, seed=i), f"{tmp_path}/c{{i}}")
                 for i in range(2)]
        report = run_cells(cells, ExecutorConfig(workers=2, cpus_per_task=1), jobs_dir="{tmp_path}/jobs",
                           progress=False)
        print([s.state for s in report.statuses])
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "['finished', 'finished']"
