"""The same ``factlens`` command at 1, 2 and the default number of torch threads, under a parallel load.

Each round starts ``--load`` CPU-bound processes (another copy of the same command, or a busy loop with
``--load-kind spin``), then runs the command once per thread setting, in a rotated order, each in a fresh
process with its own output folder; the load is stopped after the round. It prints every wall time, the medians
and the throughput ratios against one thread, with the machine's cores and load average before and after (the
machine may be shared: say so beside any number you quote).

Usage:
    python benchmarks/bench_threads.py                              # bios train --preset tiny, load 1 copy
    python benchmarks/bench_threads.py --load 2 --rounds 3 -- capitals analyze --model tiny-gpt2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = ("1", "2", "default")


def _command(args: argparse.Namespace, out: Path) -> list[str]:
    return [sys.executable, "-m", "factlens.cli", *args.command, "--out", str(out), "--quiet"]


def _start_load(args: argparse.Namespace, tmp: Path) -> list[subprocess.Popen]:
    env = {**os.environ}
    env.pop("FACTLENS_THREADS", None)
    procs = []
    for i in range(args.load):
        if args.load_kind == "spin":
            cmd = [sys.executable, "-c", "while True: pass"]
        else:  # the same command again and again, at the default thread count
            cmd = ["bash", "-c", f"while true; do {' '.join(_command(args, tmp / f'load{i}'))} >/dev/null 2>&1; "
                                 f"rm -rf {tmp / f'load{i}'}; done"]
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        os.killpg(p.pid, 15)
    for p in procs:
        p.wait()


def _run(args: argparse.Namespace, setting: str, out: Path) -> float:
    env = {**os.environ}
    env.pop("FACTLENS_THREADS", None)
    env.pop("OMP_NUM_THREADS", None)
    cmd = _command(args, out) + ([] if setting == "default" else ["--threads", setting])
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", type=int, default=1, help="parallel CPU-bound processes during each timed run")
    ap.add_argument("--load-kind", choices=["same", "spin"], default="same",
                    help="same: copies of the command; spin: a Python busy loop")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--settle", type=float, default=20.0,
                    help="seconds the load runs before the round's first timed run (the load average catches up)")
    ap.add_argument("command", nargs="*", default=["bios", "train", "--preset", "tiny"],
                    help="the factlens command (after --), without --out and --quiet")
    args = ap.parse_args()
    from factlens.threads import available_cores, default_threads

    print(f"command: factlens {' '.join(args.command)}; {available_cores()} cores, load average "
          f"{os.getloadavg()[0]:.2f} before the load; {args.load} x {args.load_kind} load; default now "
          f"{default_threads()} thread(s)")
    times: dict[str, list[float]] = {s: [] for s in SETTINGS}
    tmp = Path(tempfile.mkdtemp(prefix="bench_threads_"))
    try:
        for r in range(args.rounds):
            load = _start_load(args, tmp)
            try:
                time.sleep(args.settle)
                order = SETTINGS[r % 3:] + SETTINGS[:r % 3]
                for setting in order:
                    wall = _run(args, setting, tmp / f"r{r}_{setting}")
                    times[setting].append(wall)
                    print(f"round {r + 1}: threads {setting:>7}: {wall:6.1f} s (load average "
                          f"{os.getloadavg()[0]:.2f})", flush=True)
            finally:
                _stop(load)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = statistics.median(times["1"])
    print("\n| threads | median wall | throughput vs 1 thread |\n|---|---:|---:|")
    for s in SETTINGS:
        med = statistics.median(times[s])
        print(f"| {s} | {med:.1f} s | {base / med:.2f} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
