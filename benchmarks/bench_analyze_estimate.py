"""How many plain forward passes of its prompts ``capitals analyze`` costs: the ratio behind its time estimate.

For each model, in one process: one plain forward pass of the analysis's prompts (``estimate_analysis``), then
the whole :func:`factlens.recall.analyze`; it prints both wall times, their ratio, and the estimate
(``ANALYSIS_PASSES`` × the pass) beside the measured time.

Usage:
    python benchmarks/bench_analyze_estimate.py --models tiny-gpt2 random-gpt2 --shots 0
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch

from factlens.cli.capitals import build_model
from factlens.recall.report import ANALYSIS_PASSES, analyze, estimate_analysis


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny-gpt2", "random-gpt2"])
    ap.add_argument("--shots", type=int, default=0)
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    print("| model | one pass (s) | analyze (s) | ratio | estimate (s) | estimate / measured |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        model = build_model(name, "cpu")
        estimate_analysis(model, shots=args.shots)  # warm-up (tokenizer copies, kernels)
        one_pass, estimate = estimate_analysis(model, shots=args.shots)
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            analyze(model, shots=args.shots, out_dir=out, progress=False)
            wall = time.perf_counter() - t0
        print(f"| {name} | {one_pass:.2f} | {wall:.1f} | {wall / one_pass:.1f} | {estimate:.1f} | "
              f"{estimate / wall:.2f} |", flush=True)
    print(f"ANALYSIS_PASSES = {ANALYSIS_PASSES}; load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
