"""How long ``factlens bios mechanisms`` takes per checkpoint, with one and with two torch threads.

Runs :func:`factlens.testbeds.mechanisms.mechanisms` on a run's checkpoints (default: the shipped
``tests/data/bios_demo_run``) once per thread count, side by side, and prints wall and CPU seconds per
checkpoint, the ratio, and the machine's load average (the machine may be shared).

Usage:
    python benchmarks/bench_mechanisms.py --run out/demo --threads 1 2
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from factlens.testbeds.mechanisms import mechanisms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(Path(__file__).parents[1] / "tests" / "data" / "bios_demo_run"))
    ap.add_argument("--steps", type=int, nargs="+", help="checkpoint steps (default: all)")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    print(f"run {args.run}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        wall, cpu = time.perf_counter(), time.process_time()
        res = mechanisms(args.run, steps=args.steps, n=args.prompts, progress=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rows.append((threads, len(res.steps), wall, cpu))
        print(f"{threads} thread(s): {len(res.steps)} checkpoints × {len(res.attributes)} attributes × "
              f"{args.prompts} prompts: {wall:.1f} s wall ({wall / len(res.steps):.2f} s per checkpoint), "
              f"{cpu:.1f} s CPU")
    if len(rows) > 1:
        print(f"wall time ratio {rows[-1][0]} vs {rows[0][0]} thread(s): {rows[-1][2] / rows[0][2]:.2f}")
    print(f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
