"""What a training command will do, how long it will take on this machine, and where it writes: said before it starts.

The time is not a constant from a table: :func:`measure` times real optimiser steps of the run's own model on its
own first batch (on a copy, so the run itself is untouched) and one evaluation, on this machine under its current
load, and :class:`Estimate` scales them to the run's steps and evaluations.

Example:
    >>> import tempfile
    >>> from factlens.bios.trainer import TrainConfig, Trainer
    >>> from factlens.bios.estimate import format_seconds, measure
    >>> trainer = Trainer(TrainConfig.preset("tiny"), tempfile.mkdtemp(), progress=False)
    >>> est = measure(trainer)
    >>> est.steps, est.evals
    (30, 4)
    >>> "min" in format_seconds(125.0), est.total_s > 0
    (True, True)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path

import torch

from factlens.resources import format_bytes


def format_seconds(seconds: float) -> str:
    """``"45 s"``, ``"2 min 5 s"``, ``"4 h 32 min"``: a duration as a person reads it.

    Example:
        >>> from factlens.bios.estimate import format_seconds
        >>> format_seconds(44.6), format_seconds(125), format_seconds(16_320)
        ('45 s', '2 min 5 s', '4 h 32 min')
    """
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Measured seconds per optimiser step and per evaluation, and how many of each the run does."""

    step_s: float
    eval_s: float
    steps: int
    evals: int
    checkpoint_bytes: int
    checkpoints: int

    @property
    def total_s(self) -> float:
        return self.steps * self.step_s + self.evals * self.eval_s

    def __str__(self) -> str:
        return (f"about {format_seconds(self.total_s)} on this machine now ({self.steps:,} steps of "
                f"{self.step_s * 1e3:.0f} ms and {self.evals} evaluations of {self.eval_s:.2f} s, measured)")


def measure(trainer, repeats: int = 2) -> Estimate:
    """Time ``repeats`` optimiser steps (after one warm-up) on a copy of ``trainer``'s model and its first batch,
    and one evaluation; the trainer's model, optimiser and random state are left as they were."""
    cfg = trainer.config
    batch = trainer._on_device(trainer.stream.batch(0, trainer.rank, trainer.world))
    model = copy.deepcopy(trainer.raw_model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    with torch.random.fork_rng(devices=[]):
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            logits = trainer._logits(batch.tokens, model)  # [b, p, v]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                     batch.tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        trainer.evaluate()
        eval_s = time.perf_counter() - t0
    del model, opt
    step_s = min(times[1:]) if len(times) > 1 else times[0]
    schedule = cfg.checkpoint_steps()
    per_ckpt = sum(p.numel() * p.element_size() for p in trainer.raw_model.state_dict().values())
    return Estimate(step_s=step_s, eval_s=eval_s, steps=cfg.steps, evals=len(schedule),
                    checkpoint_bytes=per_ckpt * len(schedule), checkpoints=len(schedule))


def plan(what: str, est: Estimate, out: str | Path, *, runs: int = 1, device=None, threads: int | None = None,
         keep: str = "all") -> str:
    """The lines a long command prints before it starts: what, how long, where.

    Example:
        >>> from factlens.bios.estimate import Estimate, plan
        >>> est = Estimate(step_s=0.08, eval_s=0.5, steps=1800, evals=73, checkpoint_bytes=73 * 2**21,
        ...                checkpoints=73)
        >>> print(plan("factlens demo: train a biography run", est, "out/demo", device="cpu", threads=1))
        factlens demo: train a biography run on cpu, 1 thread
          time:  about 3 min 0 s on this machine now (1,800 steps of 80 ms and 73 evaluations of 0.50 s, measured)
          where: out/demo (73 checkpoints, 146.0 MiB; metrics.jsonl, curves.html)
    """
    total = dataclasses.replace(est, steps=est.steps * runs, evals=est.evals * runs)
    on = f" on {device}" if device is not None else ""
    on += f", {threads} thread{'s' if threads != 1 else ''}" if threads is not None else ""
    ckpts = (f"{total.checkpoints * runs} checkpoints, {format_bytes(total.checkpoint_bytes * runs)}" if keep == "all"
             else f"the last checkpoint, {format_bytes(math.ceil(est.checkpoint_bytes / max(est.checkpoints, 1)))}")
    return (f"{what}{on}\n  time:  {total}\n"
            f"  where: {out} ({ckpts}; metrics.jsonl, curves.html)")


__all__ = ["Estimate", "format_seconds", "measure", "plan"]
