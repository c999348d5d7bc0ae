"""The Lv et al. mitigation table on full-size random-weight twins of the supported models: time and peak memory.

Random weights recall nothing, so the probabilities are meaningless; this measures that the whole table runs
for each architecture within the memory budget (OPT-1.3B in fp32 must fit 16 GB of GPU / 24 GB of RAM).

Usage:
    python benchmarks/bench_mitigation_table.py --models gpt2 opt-1.3b --shots 0 1 2
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import factlens
from factlens import capitals


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(factlens.SUPPORTED))
    ap.add_argument("--shots", type=int, nargs="+", default=[0])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--max-batch", type=int, default=32)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name in args.models:
        t0 = time.perf_counter()
        model = factlens.full_size(name, compat=True, device=device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        table = capitals.mitigation_table(model, shots=args.shots, folds=args.folds, max_batch=args.max_batch,
                                          progress=False)
        gpu = f", GPU peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else ""
        print(f"{name}: {time.perf_counter() - t0:.0f} s, process peak RSS {peak_rss_gb():.1f} GiB{gpu}; "
              f"{len(table.to_dataframe())} cells")
        del model, table


if __name__ == "__main__":
    main()
