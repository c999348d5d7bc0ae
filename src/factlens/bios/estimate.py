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


def estimate_configs(configs, *, device=None, workers: int = 1) -> Estimate:
    """The measured time of training every config of ``configs`` (a grid's unfinished cells), ``workers`` at once.

    One :func:`measure` per distinct set-up (model, architecture, batch, sequence and evaluation sizes, pools):
    a grid of one recipe is measured once. Patching, fine-tuning and the sampler are left out of the measured
    copy (they cost nothing per step that matters here). With ``workers`` > 1 the total is divided among them,
    each measured at its share of the threads.

    Example:
        >>> from factlens.bios.config import TrainConfig
        >>> from factlens.bios.estimate import estimate_configs
        >>> est = estimate_configs([TrainConfig.preset("tiny", steps=10), TrainConfig.preset("tiny", steps=20)])
        >>> est.steps, est.total_s > 0
        (30, True)
    """
    import json
    import tempfile

    from factlens.bios.trainer import Trainer
    from factlens.threads import use_threads

    configs = list(configs)
    if not configs:
        return Estimate(step_s=0.0, eval_s=0.0, steps=0, evals=0, checkpoint_bytes=0, checkpoints=0)
    measured: dict[str, Estimate] = {}
    steps = evals = ckpt_bytes = ckpts = 0
    step_time = eval_time = 0.0
    threads = max(1, torch.get_num_threads() // max(1, workers))
    for config in configs:
        probe = dataclasses.replace(config, patch=None, finetune=None, sampler={"kind": "uniform"},
                                    n_people=max(config.n_people, 2))
        key = json.dumps([probe.model, probe.arch, probe.batch_size, probe.seq_len, probe.n_eval_sequences,
                          probe.n_unseen, probe.eval_batch_size, probe.pools], sort_keys=True,
                         default=str)
        if key not in measured:
            with tempfile.TemporaryDirectory() as tmp, use_threads(threads):
                measured[key] = measure(Trainer(probe, tmp, device=device, progress=False))
        m = measured[key]
        n_evals = len(config.checkpoint_steps())
        steps, evals = steps + config.steps, evals + n_evals
        step_time, eval_time = step_time + config.steps * m.step_s, eval_time + n_evals * m.eval_s
        ckpt_bytes += m.checkpoint_bytes // max(m.checkpoints, 1) * n_evals
        ckpts += n_evals
    workers = max(1, min(workers, len(configs)))
    return Estimate(step_s=step_time / max(steps, 1) / workers, eval_s=eval_time / max(evals, 1) / workers,
                    steps=steps, evals=evals, checkpoint_bytes=ckpt_bytes, checkpoints=ckpts)


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


__all__ = ["Estimate", "estimate_configs", "format_seconds", "measure", "plan"]
