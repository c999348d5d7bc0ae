"""Experiment tracking: a training run's scalars, checkpoint steps and config sent to TensorBoard or Weights & Biases.

The trainer writes every record to ``metrics.jsonl``; a tracker receives the same records (``kind`` ``"train"``:
loss, learning rate, tokens/s, memory; ``"eval"``: the attribute loss/accuracy and hallucination metrics) and
logs each number as ``<kind>/<name>`` at the record's step, plus ``checkpoint/step`` at every checkpoint and the
run's config (TensorBoard: a text summary ``config``; W&B: the run config). Choose one with
``train(..., log_to="tensorboard")`` or ``--log-to`` on ``factlens bios train``, ``bios patch`` and ``demo``.

- ``"tensorboard"``: event files in ``<run>/tensorboard`` (``tensorboard --logdir runs/``). A resumed run
  purges the events past its resume step, as ``metrics.jsonl`` is truncated.
- ``"wandb"``: one W&B run per training run (project ``$WANDB_PROJECT`` or ``factlens``, named after the run
  folder, files under ``<run>/wandb``). ``WANDB_MODE=offline`` needs no network and no account; upload later
  with ``wandb sync <run>/wandb/offline-run-*``.

Example:
    >>> import json, tempfile
    >>> from factlens.bios.config import TrainConfig
    >>> from pathlib import Path
    >>> from factlens.bios.tracking import make_tracker
    >>> out = tempfile.mkdtemp()
    >>> tracker = make_tracker("tensorboard", out, TrainConfig.preset("tiny"))
    >>> tracker.start(step=0)
    >>> tracker.log({"kind": "eval", "step": 0, "attr_loss": 7.5, "attr_acc": 0.0})
    >>> tracker.checkpoint(0)
    >>> tracker.close()
    >>> sorted(p.name for p in (Path(out) / "tensorboard").iterdir())[0].startswith("events.out.tfevents")
    True
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from factlens.errors import ConfigError, MissingDependencyError

BACKENDS = ("tensorboard", "wandb")


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """``{"<kind>/<name>": value}`` for every number of a metrics record except its step."""
    kind = record.get("kind", "metrics")
    return {f"{kind}/{k}": float(v) for k, v in record.items()
            if k not in ("kind", "step") and isinstance(v, int | float) and not isinstance(v, bool)}


class TensorBoardTracker:
    """Event files under ``<run>/tensorboard`` through ``torch.utils.tensorboard.SummaryWriter``."""

    def __init__(self, out_dir: str | Path, config) -> None:
        self.log_dir, self.config, self.writer = Path(out_dir) / "tensorboard", config, None

    def start(self, step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.log_dir), purge_step=step or None)
        if not step:
            self.writer.add_text("config", "```\n" + json.dumps(self.config.to_dict(), indent=1) + "\n```", 0)

    def log(self, record: dict[str, Any]) -> None:
        for tag, value in _scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def checkpoint(self, step: int) -> None:
        self.writer.add_scalar("checkpoint/step", step, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbTracker:
    """One W&B run per training run; ``WANDB_MODE=offline`` writes it under ``<run>/wandb`` without a network."""

    def __init__(self, out_dir: str | Path, config, *, group: str | None = None) -> None:
        self.out, self.config, self.group, self.run = Path(out_dir), config, group, None
        self.checkpoints: list[int] = []

    def start(self, step: int = 0) -> None:
        import wandb

        self.out.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "factlens"), dir=str(self.out),
                              name=self.out.resolve().name, group=self.group, config=self.config.to_dict(),
                              reinit="create_new")

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=int(record["step"]))

    def checkpoint(self, step: int) -> None:
        self.checkpoints.append(int(step))
        self.run.log({"checkpoint/step": step}, step=int(step))
        self.run.summary["checkpoint_steps"] = self.checkpoints

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def make_tracker(log_to: str | None, out_dir: str | Path, config, *, group: str | None = None):
    """The tracker for ``log_to`` (``None``, ``"tensorboard"`` or ``"wandb"``), checked before any training:
    an unknown name or a missing package raises naming the fix."""
    if log_to is None:
        return None
    if log_to not in BACKENDS:
        raise ConfigError(f"log_to={log_to!r}: choose one of {', '.join(BACKENDS)} (or None).")
    if importlib.util.find_spec(log_to) is None:
        raise MissingDependencyError(f"log_to={log_to!r} needs the {log_to} package: "
                                     'pip install "factlens[tracking]" (TensorBoard and W&B).')
    if log_to == "tensorboard":
        return TensorBoardTracker(out_dir, config)
    return WandbTracker(out_dir, config, group=group)


__all__ = ["BACKENDS", "TensorBoardTracker", "WandbTracker", "make_tracker"]
