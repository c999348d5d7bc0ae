"""Run a list of training cells here (``local``) or as a SLURM job array through ``submitit`` (``slurm``).

:func:`run_cells` takes the :class:`~factlens.bios.cells.Cell` list of a grid and returns one
:class:`CellStatus` per cell: ``finished``, ``pending``/``running`` (a SLURM job), or ``failed`` (with the job
id, its log and the last lines of its error). Finished cells are read, never retrained.

- ``local``: one cell after another in this process; with ``workers=K``, ``K`` cells at once, each in a fresh
  interpreter (:mod:`factlens.bios.cell_worker`) with its share of the cores; with several GPUs (and no ``device``), one cell per GPU at a time. A failing cell is
  reported and the others go on.
- ``slurm``: the unfinished cells are submitted as one job array (``executor.batch()``) with the partition,
  GPUs, CPUs, memory, time limit, array parallelism and extra ``sbatch`` options of :class:`ExecutorConfig`.
  The job ids are recorded atomically in ``JOBS/jobs.json`` (with each cell's config fingerprint) before
  anything waits; a later call asks SLURM (``squeue``) and the jobs' result files for their state and never
  resubmits a finished, pending or running cell (a failed one is resubmitted unless ``submit=False``). Each
  job is a ``submitit.helpers.Checkpointable``: when SLURM preempts it or its time limit nears, submitit
  requeues it, and the requeued job resumes its run from the newest resume checkpoint, so its metrics are an
  uninterrupted run's (a job requeued by ``scontrol requeue`` reruns the same way).
- Each cell sets torch's CPU threads to its CPUs (``cpus_per_task``; in a SLURM job ``SLURM_CPUS_PER_TASK``).

Example:
    >>> from factlens.bios.executor import ExecutorConfig
    >>> ExecutorConfig.from_dict({"executor": "slurm", "partition": "gpu", "gpus_per_job": 1, "time_min": 240})
    ExecutorConfig(kind='slurm', partition='gpu', gpus_per_job=1, cpus_per_task=None, mem_gb=None, time_min=240, array_parallelism=64, sbatch={}, poll_s=10.0, workers=1, log_to=None)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import queue
import shutil
import subprocess
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import submitit
from tqdm.auto import tqdm

from factlens.bios.cells import Cell, run_cell
from factlens.errors import ClusterError, ConfigError, FactlensError
from factlens.storage import atomic_write

KINDS = ("local", "slurm")
RECORD = "jobs.json"
TAIL_LINES = 8
_ALIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SUSPENDED", "STOPPED", "PREEMPTED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}


@dataclass
class ExecutorConfig:
    """Where and how the cells of a grid run.

    Attributes:
        kind: ``"local"`` (this machine) or ``"slurm"`` (a job array through submitit).
        partition: SLURM partition (``None``: the cluster's default).
        gpus_per_job: GPUs per SLURM job (one cell per job).
        cpus_per_task: CPUs per job, and the cell's torch threads (``None``: SLURM's default of one CPU in a
            job; all CPUs locally).
        mem_gb: memory per job (``None``: the partition's default).
        time_min: time limit per job in minutes; a cell that reaches it is requeued and resumes.
        array_parallelism: at most this many cells of the array run at once.
        sbatch: extra ``sbatch`` options, e.g. ``{"account": "mylab", "qos": "high", "constraint": "a100"}``.
        poll_s: seconds between two looks at SLURM while waiting.
        workers: local cells trained at once, each in a fresh interpreter; each takes ``cpus_per_task`` threads,
            else the free cores split between the workers (``FACTLENS_THREADS`` wins when set).
        log_to: also send each cell's metrics, checkpoint steps and config to ``"tensorboard"`` (event files in
            the cell's run folder) or ``"wandb"`` (one W&B run per cell); see :mod:`factlens.bios.tracking`.
    """

    kind: str = "local"
    partition: str | None = None
    gpus_per_job: int = 0
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_min: int = 24 * 60
    array_parallelism: int = 64
    sbatch: dict = field(default_factory=dict)
    poll_s: float = 10.0
    workers: int = 1
    log_to: str | None = None

    def __post_init__(self) -> None:
        from factlens.bios.tracking import BACKENDS

        if self.log_to is not None and self.log_to not in BACKENDS:
            raise ConfigError(f"log_to={self.log_to!r}; pass one of {list(BACKENDS)} or None (metrics.jsonl only).")
        if self.kind not in KINDS:
            raise ConfigError(f"executor {self.kind!r} is not one of {list(KINDS)}; pass --executor local or "
                              "--executor slurm.")
        for name in ("gpus_per_job", "time_min", "array_parallelism", "cpus_per_task", "workers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0
                                      or (value == 0 and name != "gpus_per_job")):
                raise ConfigError(f"{name}={value!r}; pass a positive integer.")
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise ConfigError(f"mem_gb={self.mem_gb!r}; pass a positive number of GB.")
        if not isinstance(self.sbatch, dict):
            raise ConfigError(f"sbatch={self.sbatch!r}; pass a table of sbatch options, e.g. {{account = "
                              "\"mylab\"}} in TOML or --sbatch account=mylab.")

    @classmethod
    def from_dict(cls, d: dict) -> ExecutorConfig:
        """From a mapping with the attribute names (``executor`` is accepted for ``kind``); unknown keys raise."""
        d = dict(d.get("executor") if isinstance(d.get("executor"), dict) else d)
        if "executor" in d:
            d["kind"] = d.pop("executor")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown executor settings {unknown}; the settings are {known}.")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> ExecutorConfig:
        """From a TOML (``.toml``) or JSON file: flat settings, or under an ``[executor]`` table."""
        import tomllib

        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read the executor config {path} ({err.strerror}); pass an existing TOML "
                              "or JSON file.") from None
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({err}).") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} holds no table of executor settings.")
        return cls.from_dict(data)

    def updated(self, **changes) -> ExecutorConfig:
        """A copy with the changes that are not ``None`` (command-line values over a file's)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class CellStatus:
    """Where one cell stands: ``state`` is ``finished``, ``pending``, ``running``, ``failed`` or ``not started``."""

    cell: Cell
    state: str
    job_id: str | None = None
    log: str | None = None
    error: str | None = None

    def describe(self) -> str:
        where = ", ".join(x for x in (f"job {self.job_id}" if self.job_id else "",
                                      f"log {self.log}" if self.log else "") if x)
        text = f"{self.cell.key}: {self.state}" + (f" ({where})" if where else "")
        if self.error:
            text += "\n" + "\n".join("    " + line for line in self.error.splitlines())
        return text


@dataclass
class CellsReport:
    """The statuses of a list of cells (in the list's order)."""

    statuses: list[CellStatus]
    submitted: list[str] = field(default_factory=list)

    def by_state(self, state: str) -> list[CellStatus]:
        return [s for s in self.statuses if s.state == state]

    @property
    def finished(self) -> set[str]:
        return {s.cell.key for s in self.by_state("finished")}

    @property
    def failed(self) -> list[CellStatus]:
        return self.by_state("failed")

    @property
    def waiting(self) -> list[CellStatus]:
        return [s for s in self.statuses if s.state in ("pending", "running")]

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame([{"cell": s.cell.key, "state": s.state, "job_id": s.job_id, "log": s.log,
                              "error": s.error} for s in self.statuses])

    def __repr__(self) -> str:
        counts = pd.Series([s.state for s in self.statuses]).value_counts().to_dict() if self.statuses else {}
        return f"CellsReport({len(self.statuses)} cells: {counts}, submitted {len(self.submitted)})"


class CellsNotFinished(ConfigError):
    """Cells a result needs are not finished (queued, running, failed or not started); ``report`` says which."""

    def __init__(self, message: str, report: CellsReport) -> None:
        super().__init__(message)
        self.report = report


class CellTask(submitit.helpers.Checkpointable):
    """The SLURM job of one cell: train (or resume) it. On preemption or near its time limit submitit calls
    ``checkpoint`` (inherited: resubmit the same cell) and requeues the job, which resumes the run."""

    def __call__(self, cell: Cell, threads: int | None, device=None, log_to: str | None = None) -> dict:
        return run_cell(cell, threads=threads, device=device, progress=False, log_to=log_to)


def run_cells(cells: Sequence[Cell], executor: ExecutorConfig | None = None, *, jobs_dir: str | Path,
              wait: bool = True, submit: bool = True, device=None, progress: bool = True,
              after: Sequence[str] = ()) -> CellsReport:
    """Run (or submit, or only look at) every unfinished cell; returns each cell's status.

    Args:
        cells: the cells (distinct keys and run folders).
        executor: local (default) or SLURM settings.
        jobs_dir: where the SLURM job records and logs go (``JOBS/jobs.json``, ``JOBS/logs/``).
        wait: wait for every SLURM job (a tqdm bar over finished cells); ``False`` returns once they are
            submitted. Local cells are trained in this call either way.
        submit: ``False`` starts nothing: it only reports (finished cells, recorded jobs' states).
        device: torch device of every cell (``None``: CUDA when the job or machine has it, else CPU).
        after: SLURM job ids that must finish successfully before these cells start (``afterok``; if one of
            them fails, SLURM cancels the waiting cells and they are reported failed).

    Raises:
        CheckpointError: a cell's run folder holds another run (nothing is started).
    """
    ex = executor or ExecutorConfig()
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys) or len({c.run_dir for c in cells}) != len(cells):
        raise ConfigError(f"cells must have distinct keys and run folders: {keys}")
    for cell in cells:
        cell.check()  # a folder holding another run is refused before anything starts
    records = _load_records(Path(jobs_dir) / RECORD)
    status = {c.key: _finished(c, records.get(c.key)) for c in cells if c.finished()}
    todo = [c for c in cells if c.key not in status]
    report = CellsReport([])
    if todo and ex.kind == "local":
        if submit:  # here, submitting is training: it always waits
            status.update(_run_local(todo, ex, device, progress, total=len(cells)))
            report.submitted = [c.key for c in todo]
        else:
            status.update({c.key: CellStatus(c, "not started") for c in todo})
    elif todo:
        status.update(_run_slurm(todo, ex, Path(jobs_dir), wait, submit, device, progress, len(cells), report,
                                 list(after)))
    report.statuses = [status[k] for k in keys]
    return report


# ------------------------------------------------------------------------------------------------ local
def _run_local(todo: list[Cell], ex: ExecutorConfig, device, progress: bool, total: int) -> dict[str, CellStatus]:
    import torch

    gpus = torch.cuda.device_count() if device is None else 0
    bar = tqdm(total=total, initial=total - len(todo), desc="cells", unit="cell", disable=not progress)

    def one(cell: Cell, dev) -> CellStatus:
        try:
            run_cell(cell, threads=ex.cpus_per_task, device=dev, progress=progress and gpus <= 1, log_to=ex.log_to)
            return CellStatus(cell, "finished")
        except Exception:  # the other cells go on; the error is reported
            return CellStatus(cell, "failed", error=_tail(traceback.format_exc()))
        finally:
            bar.update(1)

    if gpus > 1:  # one cell per GPU at a time: worker i trains on cuda:i
        cells: queue.SimpleQueue[Cell] = queue.SimpleQueue()
        for cell in todo:
            cells.put(cell)
        out: dict[str, CellStatus] = {}

        def worker(i: int) -> None:
            with contextlib.suppress(queue.Empty):
                while True:
                    cell = cells.get_nowait()
                    out[cell.key] = one(cell, f"cuda:{i}")

        with ThreadPoolExecutor(gpus) as pool:
            list(pool.map(worker, range(gpus)))
    elif ex.workers > 1 and len(todo) > 1:
        out = _run_processes(todo, ex, device, bar)
    else:
        out = {c.key: one(c, device) for c in todo}
    bar.close()
    return out


def _run_processes(todo: list[Cell], ex: ExecutorConfig, device, bar) -> dict[str, CellStatus]:
    """``ex.workers`` cells at once, each in a fresh interpreter (:mod:`factlens.bios.cell_worker`) with its share
    of the threads; a worker that fails is reported with the last lines of its traceback."""
    import pickle
    import sys

    from factlens.threads import resolve_threads

    workers = min(ex.workers, len(todo))
    threads = resolve_threads(ex.cpus_per_task, concurrent=workers)

    def one(cell: Cell) -> CellStatus:
        job = pickle.dumps((cell, threads, None if device is None else str(device), ex.log_to))
        done = subprocess.run([sys.executable, "-m", "factlens.bios.cell_worker"], input=job, capture_output=True,
                              check=False)
        bar.update(1)
        if done.returncode == 0:
            return CellStatus(cell, "finished")
        error = done.stderr.decode(errors="replace") or f"the worker exited with code {done.returncode}"
        return CellStatus(cell, "failed", error=_tail(error))

    with ThreadPoolExecutor(workers) as pool:
        return dict(zip([c.key for c in todo], pool.map(one, todo), strict=True))


# ------------------------------------------------------------------------------------------------ SLURM
def _tail(text: str, n: int = TAIL_LINES) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-n:])


def _squeue() -> dict[str, str] | None:
    """``{job id: state}`` of this user's queued and running jobs (array tasks one per line); ``None`` where
    SLURM's ``squeue`` is not installed (results copied to another machine: only result files are read)."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "--me", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise FactlensError(f"squeue failed ({err}); is SLURM reachable from here? Re-run later to collect.") from None
    return dict(line.strip().split("|", 1) for line in out.splitlines() if "|" in line)


def _outcome(job: submitit.SlurmJob, queued: dict[str, str] | None) -> tuple[str, str | None]:
    """(state, error) of a recorded job: finished / failed from its result file, else SLURM's queue."""
    if job.paths.result_pickle.exists():
        outcome, result = submitit.core.utils.pickle_load(job.paths.result_pickle)
        if outcome == "success":
            return "finished", None
        return "failed", _tail(_read(job.paths.stderr) or str(result))
    if queued is None:
        return "pending", "no result yet, and SLURM (squeue) is not reachable from here to say more"
    state = queued.get(str(job.job_id))
    if state in _ALIVE:
        return ("running" if state in ("RUNNING", "COMPLETING") else "pending"), None
    return "failed", _tail("the job ended without a result (cancelled, killed for memory or time, its node "
                           "failed, or a job it waited for failed); its log ends:\n"
                           f"{_read(job.paths.stderr) or '(no log)'}")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _finished(cell: Cell, record: dict | None) -> CellStatus:
    """A finished cell's status, with the SLURM job that trained it when the records name one for this cell."""
    if record is None or record.get("fingerprint") != cell.fingerprint:
        return CellStatus(cell, "finished")
    job = submitit.SlurmJob(folder=record["folder"], job_id=record["job_id"])
    return CellStatus(cell, "finished", str(job.job_id), str(job.paths.stderr))


def _load_records(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not JSON ({err}); it records the submitted SLURM jobs. Delete it only if "
                          "none of them is still queued (squeue --me), then run again.") from None


def _run_slurm(todo: list[Cell], ex: ExecutorConfig, jobs_dir: Path, wait: bool, submit: bool, device,
               progress: bool, total: int, report: CellsReport, after: list[str]) -> dict[str, CellStatus]:
    if shutil.which("sbatch") is None and (submit or wait):
        raise ConfigError("--executor slurm needs SLURM's sbatch on the PATH; run on a SLURM login node, or use "
                          "--executor local.")
    record_path = jobs_dir / RECORD
    records = _load_records(record_path)
    queued = _squeue() if records else {}
    jobs: dict[str, submitit.SlurmJob] = {}
    out: dict[str, CellStatus] = {}
    resubmit = []
    for cell in todo:
        rec = records.get(cell.key)
        if rec is None or rec.get("fingerprint") != cell.fingerprint:
            resubmit.append(cell)
            continue
        job = submitit.SlurmJob(folder=rec["folder"], job_id=rec["job_id"])
        state, error = _outcome(job, queued)
        if state == "finished" and not cell.finished():
            state, error = "failed", "the job returned but the run folder does not hold the finished run"
        out[cell.key] = CellStatus(cell, state, str(job.job_id), str(job.paths.stderr), error)
        if state in ("pending", "running"):
            jobs[cell.key] = job
        elif state == "failed" and submit:
            print(f"resubmitting {out[cell.key].describe()}")
            resubmit.append(cell)
    if submit and resubmit:
        executor = submitit.AutoExecutor(folder=jobs_dir / "logs" / "%j", cluster="slurm")
        params = dict(timeout_min=ex.time_min, slurm_array_parallelism=ex.array_parallelism, name="factlens-cell",
                      slurm_additional_parameters=dict(ex.sbatch))
        for key, value in (("slurm_partition", ex.partition), ("gpus_per_node", ex.gpus_per_job or None),
                           ("cpus_per_task", ex.cpus_per_task), ("mem_gb", ex.mem_gb)):
            if value is not None:
                params[key] = value
        if after:  # start once those jobs succeeded; cancelled by SLURM if one of them fails
            params["slurm_additional_parameters"].update({"dependency": "afterok:" + ":".join(after),
                                                          "kill-on-invalid-dep": "yes"})
        executor.update_parameters(**params)
        task = CellTask()
        try:
            with executor.batch():
                pending = [executor.submit(task, cell, ex.cpus_per_task or 1, device, ex.log_to) for cell in resubmit]
        except submitit.core.utils.FailedJobError as err:  # sbatch said no: nothing was submitted or recorded
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise ClusterError(
                f"SLURM refused the job array of {len(resubmit)} cell(s): {reason}. Check that `sinfo` answers (the "
                "controller, slurmctld, is running and reachable) and that the partition and sbatch options are "
                "valid on this cluster, or run with --executor local.") from None
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        for cell, job in zip(resubmit, pending):
            records[cell.key] = {"job_id": str(job.job_id), "fingerprint": cell.fingerprint,
                                 "folder": str(jobs_dir / "logs" / "%j"), "submitted": now}
            jobs[cell.key] = job
            out[cell.key] = CellStatus(cell, "pending", str(job.job_id), str(job.paths.stderr))
        jobs_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(record_path, json.dumps(records, indent=1))
        report.submitted = [c.key for c in resubmit]
        ids = sorted({str(j.job_id).split("_")[0] for j in pending})
        print(f"submitted {len(resubmit)} cell{'s' * (len(resubmit) != 1)} to SLURM as job array {', '.join(ids)} "
              f"(logs {jobs_dir / 'logs'}; records {record_path})")
    for cell in todo:
        out.setdefault(cell.key, CellStatus(cell, "not started"))  # submit=False and no record
    if wait and jobs:
        _wait(jobs, out, ex, progress, total)
    return out


def _wait(jobs: dict[str, submitit.SlurmJob], out: dict[str, CellStatus], ex: ExecutorConfig, progress: bool,
          total: int) -> None:
    """Poll SLURM until every job has finished or failed, with a bar over finished cells."""
    left = dict(jobs)
    bar = tqdm(total=total, initial=total - len(left), desc="cells (SLURM)", unit="cell", disable=not progress)
    while left:
        time.sleep(ex.poll_s)
        queued = _squeue()
        for key, job in list(left.items()):
            state, error = _outcome(job, queued)
            cell = out[key].cell
            if state == "finished" and not cell.finished():
                state, error = "failed", "the job returned but the run folder does not hold the finished run"
            out[key] = CellStatus(cell, state, str(job.job_id), str(job.paths.stderr), error)
            if state in ("finished", "failed"):
                del left[key]
                bar.update(1)
                if state == "failed":
                    tqdm.write(out[key].describe())
        states = [s.state for s in out.values()]
        bar.set_postfix(running=states.count("running"), pending=states.count("pending"),
                        failed=states.count("failed"))
    bar.close()


__all__ = ["KINDS", "CellStatus", "CellTask", "CellsNotFinished", "CellsReport", "ExecutorConfig", "run_cells"]
