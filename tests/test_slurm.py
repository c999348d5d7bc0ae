"""Cells on a real SLURM cluster through submitit (skipped where ``sbatch`` is absent; ``.ci/run`` starts a
one-node cluster with ``scripts/slurm_local.sh start``): the tiny reproduction on SLURM reports exactly the local
run's numbers, re-running never resubmits a queued, running or finished cell, a failed cell shows its job id,
log and error, and a cell requeued while it trains (``scontrol requeue``, or preempted: submitit's checkpoint
and requeue) resumes to an uninterrupted run's metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import submitit

from factlens.bios.cells import Cell, run_cell
from factlens.bios.executor import RECORD, ExecutorConfig, run_cells
from factlens.bios.reproduce import SCALES, reproduce
from factlens.bios.trainer import PatchConfig
from factlens.checkpoints import list_checkpoints
from factlens.cli import main
from test_bios_train import tiny_config


def _slurm_reachable() -> bool:
    if shutil.which("sbatch") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _slurm_reachable(), reason="no SLURM cluster here (sbatch absent or sinfo "
                                 "fails); scripts/slurm_local.sh start starts one")]
TIMING = ("tokens_per_s", "rss_gib", "peak_rss_gib", "threads")


def _records(out):
    return {k: v["job_id"] for k, v in json.loads((out / "jobs" / RECORD).read_text()).items()}


def _metrics(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_reproduction_on_slurm_reports_the_local_numbers(tmp_path, capsys):
    slurm, local = tmp_path / "slurm", tmp_path / "local"
    settings = tmp_path / "cluster.json"
    settings.write_text(json.dumps({"executor": "slurm", "cpus_per_task": 1, "poll_s": 1, "time_min": 30}))
    command = ["bios", "reproduce", "--scale", "tiny", "--stages", "dynamics", "--out", str(slurm), "--no-png",
               "--quiet", "--executor-config", str(settings)]
    assert main([*command, "--no-wait"]) == 0  # submits every cell and returns at once
    first = _records(slurm)
    stage1 = ["curriculum/alpha0.6", "curriculum/alpha0.8", "scaling/N128", "scaling/N16", "scaling/N32",
              "scaling/N64"]
    assert sorted(k for k in first if not k.startswith("patching/")) == stage1
    arrays = {k.split("/")[0]: first[k].split("_")[0] for k in first}
    assert arrays["scaling"] == arrays["curriculum"] != arrays["patching"]  # two job arrays, the patching one ...
    control = first[f"scaling/N{SCALES['tiny'].patch_people}"]
    dependency = subprocess.run(["scontrol", "show", "job", first["patching/ref0_start0"]], capture_output=True,
                                text=True).stdout
    assert f"afterok:{control}" in dependency or "JobState=COMPLETED" in dependency  # ... waits for its control

    # the same cells here, with the jobs' one thread each (another thread count sums in another order)
    expected = reproduce("tiny", local, progress=False, write_png=False, executor=ExecutorConfig(cpus_per_task=1))

    assert main(command) == 0  # the same command again: waits for the cells
    second = _records(slurm)
    assert second == first  # queued, running or finished: never resubmitted
    assert len(second) == len(stage1) + len(expected.patching)
    got, want = (json.loads((d / "summary.json").read_text()) for d in (slurm, local))
    for key in ("scaling", "patching", "curriculum", "fit", "baseline"):
        assert got[key] == want[key], key
    assert got["failed"] == [] and got["missing"] == []

    capsys.readouterr()
    assert main(command) == 0  # finished: read, nothing submitted or trained
    assert "submitted" not in capsys.readouterr().out and _records(slurm) == second
    assert json.loads((slurm / "summary.json").read_text())["trained"] == []


@pytest.mark.parametrize("interrupt", ["scontrol requeue", "preemption signal"])
def test_a_requeued_cell_resumes_to_the_uninterrupted_metrics_and_a_failed_cell_shows_its_error(tmp_path, interrupt):
    # long enough that the job is still training when the requeue kills it (KillWait=5 s): a 300-step run
    # could finish inside that window on idle cores
    config = tiny_config(steps=1500, checkpoint_every=250, resume_every=10, log_every=10)
    long = Cell("long", config, str(tmp_path / "slurm" / "long"))
    missing_reference = PatchConfig(reference=str(tmp_path / "no-such-run"), reference_step=0)
    bad = Cell("bad", tiny_config(steps=4, patch=missing_reference), str(tmp_path / "slurm" / "bad"))
    ex = ExecutorConfig(kind="slurm", cpus_per_task=1, poll_s=1, time_min=30)
    jobs = tmp_path / "slurm" / "jobs"
    submitted = run_cells([long, bad], ex, jobs_dir=jobs, wait=False, progress=False)
    job_id = submitted.statuses[0].job_id

    deadline = time.time() + 300
    while not list_checkpoints(long.path / "resume") and time.time() < deadline:
        time.sleep(0.2)
    assert list_checkpoints(long.path / "resume") and not long.finished(), "no resume point to requeue from"
    requeued_at = time.time()
    if interrupt == "scontrol requeue":  # the cluster requeues the job: SIGTERM (ignored), SIGKILL, requeue
        subprocess.run(["scontrol", "requeue", job_id], check=True)
    else:  # preemption: SIGTERM then USR2; submitit checkpoints the cell and requeues the job
        submitit.SlurmJob(folder=jobs / "logs" / "%j", job_id=job_id)._interrupt()

    run_cell(Cell("uninterrupted", config, str(tmp_path / "uninterrupted")), threads=1)  # meanwhile, uninterrupted
    report = run_cells([long, bad], ex, jobs_dir=jobs, submit=False, progress=False)  # waits, submits nothing

    done, failed = report.statuses
    assert done.state == "finished" and done.job_id == job_id  # the same job, requeued by SLURM
    log = (jobs / "logs" / job_id / f"{job_id}_0_log.out").read_text()  # submitit's own log lines
    assert log.count("Starting with JobEnvironment") == 2  # it ran twice ...
    if interrupt == "preemption signal":
        assert "this job is preempted" in log and "Calling checkpoint method" in log
    result = json.loads(json.dumps(run_cells_result(jobs, job_id)))
    assert result["trained"] is True  # ... and the second run trained: the first was stopped before the end
    assert (long.path / "checkpoints" / "step_0000000").stat().st_mtime < requeued_at  # resumed, not restarted
    assert _metrics(long.path) == _metrics(tmp_path / "uninterrupted")

    assert failed.state == "failed" and failed.job_id and failed.job_id != job_id
    assert failed.log.endswith("_log.err") and Path(failed.log).exists()
    assert "no-such-run" in failed.error
    assert f"job {failed.job_id}" in failed.describe() and failed.log in failed.describe()


def run_cells_result(jobs, job_id) -> dict:
    """The value the job returned (submitit's result file)."""
    outcome, value = submitit.core.utils.pickle_load(jobs / "logs" / job_id / f"{job_id}_0_result.pkl")
    assert outcome == "success"
    return value
