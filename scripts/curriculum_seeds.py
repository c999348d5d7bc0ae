"""More seeds of the headline CPU curriculum cells: uniform against the power law at N = 1,300 (1,800 steps).

Each seed changes the people, the initialisation and the data order (``seed`` = ``data_seed``). The cells train
through the local executor, ``--workers`` at once, and the script prints each cell's plateau end (0.98 ×
baseline rule), final loss and accuracy, and the plateau's shortening under the power law per seed. Measured
numbers are in docs/reproduction.md (§3, "Seeds settle it").

Usage:
    python scripts/curriculum_seeds.py --out out/curriculum-seeds --seeds 1 2 --workers 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from factlens.bios.cells import Cell
from factlens.bios.config import TrainConfig
from factlens.bios.executor import ExecutorConfig, run_cells


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/curriculum-seeds"), help="one run folder per cell")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="seed = data_seed of each pair of cells")
    ap.add_argument("--people", type=int, default=1300, help="population size N")
    ap.add_argument("--alpha", type=float, default=0.8, help="power-law exponent against uniform")
    ap.add_argument("--workers", type=int, default=2, help="cells trained at once")
    args = ap.parse_args(argv)
    cells = []
    for seed in args.seeds:
        for alpha in (0.0, args.alpha):
            sampler = {"kind": "power_law", "alpha": alpha} if alpha else {"kind": "uniform"}
            config = TrainConfig.preset("demo", n_people=args.people, n_unseen=0, seed=seed, data_seed=seed,
                                        sampler=sampler)
            cells.append(Cell(f"seed{seed}_alpha{alpha:g}", config, str(args.out.absolute() / f"seed{seed}_alpha{alpha:g}")))
    print(f"training {len(cells)} demo-recipe cells of N = {args.people} ({args.workers} at a time) into {args.out}")
    t0 = time.perf_counter()
    report = run_cells(cells, ExecutorConfig(workers=args.workers), jobs_dir=args.out / "jobs", progress=True)
    print(f"{time.perf_counter() - t0:.0f} s")
    ends = {}
    for status in report.statuses:
        if status.state != "finished":
            print(status.describe())
            continue
        history = status.cell.history()
        ends[status.cell.key] = history.plateau_end()
        print(f"{status.cell.key}: plateau end {ends[status.cell.key]}, final loss {history.final['attr_loss']:.3f}, "
              f"accuracy {history.final['attr_acc']:.3f}")
    for seed in args.seeds:
        uniform, skewed = ends.get(f"seed{seed}_alpha0"), ends.get(f"seed{seed}_alpha{args.alpha:g}")
        if uniform and skewed:
            print(f"seed {seed}: plateau {1 - skewed / uniform:.0%} shorter under the power law")
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
