"""The CPU-scale forgetting cells at another fine-tuning learning rate and length: does forgetting grow with
the number of new people when the fine-tuning LR is as small, relative to the pre-training peak, as the
paper's (3e-5 after a 4e-4 peak: 0.075 of it, for a quarter of the pre-training steps)?

The script runs ``factlens bios reproduce``'s ``finetune`` stage on the cpu scale with the fine-tuning
``--lr``, ``--steps`` and evaluation interval ``--every`` replaced, no-replay cells only (``--sizes`` new
people), into its own folder. The pre-training run is trained there too, each cell on ``--threads`` torch
threads: training is deterministic at a fixed thread count, and ``factlens bios reproduce --workers 2`` trains
the cpu scale's cells on one thread each, so the default gives that run bit for bit (another thread count sums
in another order and the runs drift apart: 0.893 instead of 0.897 final accuracy with two threads). It prints
the forgetting table. Measured numbers are in
docs/reproduction.md (§4, "A smaller fine-tuning LR").

Usage:
    python scripts/forgetting_lr.py --lr 1.5e-4 --steps 225 --every 15 --out out/forgetting-lr --workers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from factlens.bios.executor import ExecutorConfig
from factlens.bios.reproduce_forgetting import FORGETTING_SCALES, reproduce_forgetting


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/forgetting-lr"), help="the stage's folder")
    ap.add_argument("--lr", type=float, default=1.5e-4, help="constant fine-tuning learning rate")
    ap.add_argument("--steps", type=int, default=225, help="fine-tuning steps")
    ap.add_argument("--every", type=int, default=15, help="evaluate every this many fine-tuning steps")
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 40, 80, 160], help="new people of each cell")
    ap.add_argument("--workers", type=int, default=2, help="cells trained at once")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each cell")
    ap.add_argument("--scale", choices=sorted(FORGETTING_SCALES), default="cpu", help="the pre-training run's scale")
    args = ap.parse_args(argv)
    scale = dataclasses.replace(FORGETTING_SCALES[args.scale], lr=args.lr, steps=args.steps, checkpoint_every=args.every,
                                new_sizes=tuple(args.sizes), replay_weights=(), keep_optimizer=(), rare=None)
    print(f"fine-tuning the {args.scale} scale's pre-training run (trained first if {args.out} lacks it; cpu: about "
          f"3 min on 2 cores) on {', '.join(map(str, args.sizes))} new people: {args.steps} steps at LR {args.lr:g}, "
          f"{args.workers} cells at a time on {args.threads} thread(s) each, into {args.out}")
    t0 = time.perf_counter()
    result = reproduce_forgetting(scale, args.out, stages=("finetune",), executor=ExecutorConfig(workers=args.workers, cpus_per_task=args.threads))
    print(f"{time.perf_counter() - t0:.0f} s; report {result.report}")
    if result.finetune is None or result.finetune.empty:
        print("no fine-tuning cell finished:", ", ".join(result.missing))
        return 1
    columns = ["new_people", "new_fraction", "old_acc_start", "old_acc_early", "early_step", "old_acc_min",
               "old_acc_end", "new_acc_end", "new_acc_half_step"]
    print(result.finetune[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 1 if result.missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
