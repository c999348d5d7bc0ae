"""The whole ``capitals analyze`` on a full-size random twin: the shared-pass path vs the old one, side by side.

New (:func:`factlens.recall.analyze`): one cached clean pass serves every analysis, the mitigation folds reuse
it (3 forward passes of the prompts). Old (the test references in ``tests/reference_recall.py``): every step
runs its own passes and the mitigation table one hooked pass per method and fold (12). Both paths run in the
same process on the same model, alternating, and the script prints wall and CPU seconds per step, the ratios and
the largest difference between their outputs. It counts the forward passes of the whole model.

Usage:
    python benchmarks/bench_analyze.py --model gpt2 --rounds 1
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import factlens
from factlens.recall.regression import fit_decomposition
from factlens.recall.report import analyze

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_recall import analyze_unshared, mitigation_reference


def count_forwards(model):
    """Counts calls of the bridge's forward (whole-model passes, chunks included)."""
    calls = {"n": 0}
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__("n", calls["n"] + 1))
    return calls


def one(model, share: bool, calls, out: str | None) -> tuple[dict[str, float], float, float, int, object]:
    calls["n"] = 0
    w, c = time.perf_counter(), time.process_time()
    if share:
        report = analyze(model, shots=0, out_dir=out, progress=False)
        return report.timings, time.perf_counter() - w, time.process_time() - c, calls["n"], report
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ds = factlens.recall.dataset_for(model)
    steps = analyze_unshared(model, ds)
    timings["analyses"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    frames, _ = mitigation_reference(model)
    timings["mitigation table"] = time.perf_counter() - t0
    report = SimpleNamespace(
        lens=steps["lens"], path_patching=steps["path_patching"], movers=steps["movers"],
        final_layer=steps["final_layer"], acts=steps["acts"],
        mean_prob={m: float(df["prob"].mean()) for m, df in frames.items()})
    return timings, time.perf_counter() - w, time.process_time() - c, calls["n"], report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-old", action="store_true", help="time the new path only")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device {device}, "
          f"torch {torch.__version__}")
    model = factlens.full_size(args.model, compat=True, device=device)
    calls = count_forwards(model)
    runs = {"new": [], "old": []}
    for _ in range(args.rounds):
        for name in (["new"] if args.no_old else ["new", "old"]):
            with tempfile.TemporaryDirectory() as out:
                runs[name].append(one(model, name == "new", calls, out))
    for name, rs in runs.items():
        if not rs:
            continue
        timings, wall, cpu, forwards, _ = min(rs, key=lambda r: r[1])
        print(f"\n{name}: wall {wall:.1f} s (save included), CPU {cpu:.1f} s, bridge forward calls {forwards}")
        print("  " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    if runs["old"]:
        new, old = min(runs["new"], key=lambda r: r[1]), min(runs["old"], key=lambda r: r[1])
        print(f"\nold / new: wall {old[1] / new[1]:.2f}x, CPU {old[2] / new[2]:.2f}x, forward calls "
              f"{old[3]} -> {new[3]}")
        a, b = new[4], old[4]
        diffs = {"logit lens P": (a.lens.prob - b.lens.prob).abs().max(),
                 "path patching %": (a.path_patching.values - b.path_patching.values).abs().max(),
                 "mover r": (a.movers.r - b.movers.r).nan_to_num().abs().max(),
                 "final-layer DLA": (a.final_layer.dla - b.final_layer.dla).abs().max(),
                 "mitigation mean P": max(abs(a.mitigation.cell(0, m) - p) for m, p in b.mean_prob.items())}
        for key, dec in a.decompositions.items():
            if key.endswith("/pooled"):
                acts = b.acts[dec.layer]
                diffs[f"{key} beta"] = (dec.beta - fit_decomposition(acts.target, acts.regressors).beta).abs().max()
        print("largest |new − old|: " + ", ".join(f"{k} {float(v):.1e}" for k, v in diffs.items()))


if __name__ == "__main__":
    main()
