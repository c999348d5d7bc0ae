"""A grid of small training cells on the CPU: one cell at a time on every core, against one worker per core.

The same cells (the demo recipe, ``--steps`` each, distinct seeds) are trained twice in fresh folders: with
``ExecutorConfig(workers=1)`` (one process, ``--cores`` torch threads) and with ``workers=--cores`` (one process
per core, one thread each). It prints both wall times and their ratio; the metrics of each cell are compared
between the two (they agree up to the thread count's summation order).

Usage:
    python benchmarks/bench_workers.py --cells 4 --steps 200 --cores 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from factlens.bios.cells import Cell
from factlens.bios.config import TrainConfig
from factlens.bios.executor import ExecutorConfig, run_cells


def cells(root: Path, n: int, steps: int) -> list[Cell]:
    return [Cell(f"c{i}", TrainConfig.preset("demo", steps=steps, seed=i, n_unseen=0), str(root / f"c{i}"))
            for i in range(n)]


def final_loss(cell: Cell) -> float:
    rows = [json.loads(line) for line in (Path(cell.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval"][-1]["attr_loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    print(f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; {args.cells} demo "
          f"cells of {args.steps} steps")
    walls, losses = {}, {}
    for workers, threads in ((1, args.cores), (args.cores, 1)):
        with tempfile.TemporaryDirectory() as tmp:
            todo = cells(Path(tmp), args.cells, args.steps)
            t0 = time.perf_counter()
            report = run_cells(todo, ExecutorConfig(workers=workers, cpus_per_task=threads), jobs_dir=Path(tmp) / "j",
                               progress=False)
            walls[workers] = time.perf_counter() - t0
            assert not report.failed, report.failed
            losses[workers] = [final_loss(c) for c in todo]
        print(f"workers={workers} x {threads} thread(s): {walls[workers]:.1f} s wall", flush=True)
    one, many = walls[1], walls[args.cores]
    diff = max(abs(a - b) for a, b in zip(losses[1], losses[args.cores], strict=True))
    print(f"ratio (one at a time / {args.cores} workers): {one / many:.2f}x; largest final-loss difference "
          f"{diff:.2e}; load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
