"""How big ``run_with_cache`` gets for the full-size models, and how exact factlens's prediction is.

For each model (full-size random-weight twin, fp32): the time ``estimate_cache`` takes, its prediction against
the bytes of a real cache at a shape that fits (``--check-batch`` × ``--check-len``), and the predicted cache
at research shapes, all hooks and attention patterns only, next to the memory this machine has free.

Usage:
    python benchmarks/bench_cache_estimate.py --models gpt2 gpt2-large opt-1.3b
"""

from __future__ import annotations

import argparse
import time

import torch

import factlens
from factlens.cache import cache_nbytes, estimate_cache
from factlens.resources import available_bytes, format_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(factlens.SUPPORTED))
    ap.add_argument("--check-batch", type=int, default=4)
    ap.add_argument("--check-len", type=int, default=64)
    ap.add_argument("--shapes", nargs="+", default=["8x128", "64x1024"], help="batch x seq_len to predict")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, free {format_bytes(available_bytes(device))}")
    for name in args.models:
        model = factlens.full_size(name, compat=True, device=device)
        t0 = time.perf_counter()
        est = estimate_cache(model, args.check_batch, args.check_len)
        dt = time.perf_counter() - t0
        tokens = torch.randint(0, 1000, (args.check_batch, args.check_len), device=device)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
        real = cache_nbytes(cache)
        del cache
        print(f"{name}: estimate in {dt:.2f} s; {args.check_batch}x{args.check_len}: predicted "
              f"{format_bytes(est.total)}, real {format_bytes(real)} (ratio {est.total / real:.6f})")
        for shape in args.shapes:
            b, t = (int(x) for x in shape.split("x"))
            full = estimate_cache(model, b, t)
            pat = estimate_cache(model, b, t, names_filter=lambda n: n.endswith("hook_pattern"))
            print(f"  {shape}: all {len(full.per_hook)} hooks {format_bytes(full.total)}, patterns only "
                  f"{format_bytes(pat.total)}; largest {[(k, format_bytes(v)) for k, v in full.largest(2)]}")
        del model


if __name__ == "__main__":
    main()
