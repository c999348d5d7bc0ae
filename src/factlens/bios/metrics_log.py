"""A training run's metrics log, ``metrics.jsonl``: one JSON record a line, appended and flushed as the run goes.

Each record is a dict with ``kind`` (``"train"`` or ``"eval"``), an integer ``step`` and the metrics. A crash
can tear the last line; :func:`read_jsonl` drops it with a warning and :func:`truncate_metrics` rewrites the log
to a resume point, so a resumed run never duplicates or loses a row. Read a run's log as a
:class:`~factlens.bios.history.TrainingHistory` with :attr:`factlens.bios.run.Run.history`.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from factlens.bios.metrics_log import METRICS, append_jsonl, read_jsonl, truncate_metrics
    >>> log = Path(tempfile.mkdtemp()) / METRICS
    >>> append_jsonl(log, {"kind": "eval", "step": 0, "attr_loss": 9.0})
    >>> append_jsonl(log, {"kind": "train", "step": 10, "loss": 5.0})
    >>> truncate_metrics(log, 0)
    >>> read_jsonl(log)
    []
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from factlens.errors import CheckpointError
from factlens.storage import atomic_write, storage_errors

METRICS = "metrics.jsonl"
KINDS = ("train", "eval")


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON record (a line) to a metrics log and flush it to disk."""
    line = json.dumps(record) + "\n"
    with storage_errors(path, len(line)), open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics log. A torn last line (the process died mid-write) is dropped with a warning;
    any other line that is not a factlens record raises :class:`~factlens.errors.CheckpointError`."""
    path = Path(path)
    lines = path.read_text().split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no newline after it: a write cut short by a crash
                warnings.warn(f"{path}: dropped a torn last line (the run was interrupted while writing it).",
                              stacklevel=2)
                continue
            raise CheckpointError(f"{path} line {i + 1} is not JSON: the file is corrupt or not a factlens "
                                  "metrics log. Delete that line, or the file, and resume the run.") from None
        if not (isinstance(record, dict) and record.get("kind") in KINDS and isinstance(record.get("step"), int)):
            raise CheckpointError(f"{path} line {i + 1} is not a factlens metrics record (a dict with 'kind' "
                                  f"{' or '.join(KINDS)} and an integer 'step'); this file belongs to another tool. "
                                  "Use another output directory.")
        rows.append(record)
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Keep exactly what a run resumed at ``step`` has already logged: training rows up to ``step`` and
    evaluations before it (the evaluation at ``step`` runs again). ``step=0`` empties the log. A torn last line
    is dropped. Rewritten atomically, only when something changes."""
    if not path.exists():
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn line is expected here: this is the recovery
        rows = read_jsonl(path)
    keep = [r for r in rows if r["step"] < step or (r["step"] == step and r["kind"] == "train")]
    text = "".join(json.dumps(r) + "\n" for r in keep)
    if text != path.read_text():
        atomic_write(path, text)


__all__ = ["KINDS", "METRICS", "append_jsonl", "read_jsonl", "truncate_metrics"]
