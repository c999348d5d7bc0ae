"""Peak memory of loading a full-size twin in compatibility mode: factlens.compat (part by part) vs TL's own.

Each setup runs in a fresh subprocess (peak RSS is per process): build the random-weight HF model, boot the
bridge, enable compatibility mode. It prints the weights, the process baseline (imports), the peak RSS and
``(peak − baseline) / weights``; ``none`` is the same load without compatibility mode (the floor). Run under
``/usr/bin/time -v`` for the kernel's own maximum-RSS figure: the script's numbers are ``getrusage``'s.

Usage:
    python benchmarks/bench_compat_load.py --models gpt2-medium opt-1.3b --modes none parts tl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
import torch, transformers, transformer_lens.model_bridge
from factlens.compat import enable_compatibility_mode
from factlens.models import bridge_from_hf, build_hf, resolve
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
name, mode = sys.argv[1], sys.argv[2]
base = peak()
t = time.perf_counter()
hf = build_hf(resolve(name).name, full_size=True).eval()
weights = sum(p.numel() * p.element_size() for p in hf.parameters()) / 2**30
bridge = bridge_from_hf(hf, compat=False, copy_model=False)
if mode != "none":
    enable_compatibility_mode(bridge, low_memory=mode == "parts")
print(json.dumps({"model": name, "mode": mode, "weights": weights, "baseline": base, "peak": peak(),
                  "seconds": time.perf_counter() - t}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gpt2-medium", "opt-1.3b"])
    ap.add_argument("--modes", nargs="+", default=["none", "parts", "tl"], choices=["none", "parts", "tl"])
    args = ap.parse_args()
    print("| model | setup | weights (GiB) | baseline (GiB) | peak RSS (GiB) | (peak − baseline) / weights | s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        results = {}
        for mode in args.modes:
            out = subprocess.run([sys.executable, "-c", CHILD, name, mode], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[mode] = r
            label = {"none": "no compatibility mode (floor)", "parts": "factlens.compat (part by part)",
                     "tl": "TL enable_compatibility_mode"}[mode]
            print(f"| {name} | {label} | {r['weights']:.2f} | {r['baseline']:.2f} | {r['peak']:.2f} | "
                  f"{(r['peak'] - r['baseline']) / r['weights']:.2f} | {r['seconds']:.0f} |", flush=True)
        if "parts" in results and "tl" in results:
            print(f"| {name} | TL peak / factlens peak | | | {results['tl']['peak'] / results['parts']['peak']:.2f}x | | |")


if __name__ == "__main__":
    main()
