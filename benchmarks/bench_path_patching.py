"""Benchmark: factlens's batched path patching vs. a TransformerLens per-index sweep, same numbers.

Both compute Lv et al.'s heads/MLPs → final-residual path patching (all q/k/v frozen to their clean values,
the sender's output at ``end`` replaced by its mean over the counterfactual prompts, metric 'iw'):

- **factlens**: :func:`factlens.recall.path_patch` (pass C on the ``end`` residual through the MLPs).
- **TransformerLens**: ``transformer_lens.patching.generic_activation_patch`` over (layer, head) on
  ``hook_z`` and over layer on ``hook_mlp_out``, with a setter that writes the counterfactual mean at each
  prompt's ``end`` (one full forward pass of the whole batch per index, as
  ``get_act_patch_attn_head_out_all_pos`` does), while persistent hooks freeze every ``hook_q/k/v``.

Run:  python benchmarks/bench_path_patching.py --model gpt2 --n-prompts 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import factlens
from factlens.recall import dataset_for, path_patch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_recall import tl_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2", help="full-size random-weight twin: gpt2, gpt2-medium, ... (default gpt2)")
    ap.add_argument("--n-prompts", type=int, default=32, help="prompts (a seeded subset of the 225; default 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batch", type=int, default=1024, help="factlens rows per step")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = factlens.full_size(args.model, seed=args.seed)
    print(f"model {args.model} (random weights, {model.cfg.n_layers}L x {model.cfg.n_heads}H, d={model.cfg.d_model}) "
          f"built in {time.perf_counter() - t0:.1f}s; torch threads {torch.get_num_threads()}")
    ds = dataset_for(model, n=args.n_prompts, seed=args.seed)
    cf = ds.counterfactual(args.seed)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    print(f"{len(ds)} prompts, {L * H} heads + {L} MLPs = {L * H + L} senders")

    t0 = time.perf_counter()
    fast = path_patch(model, ds, cf, metric="iw", max_batch=args.max_batch, progress=args.progress)
    t_fast = time.perf_counter() - t0
    print(f"factlens path_patch [{fast.method}]: {t_fast:.1f}s")

    t0 = time.perf_counter()
    tl_heads, tl_mlp = tl_sweep(model, ds, cf, args.progress)
    t_tl = time.perf_counter() - t0
    print(f"TransformerLens generic_activation_patch sweep: {t_tl:.1f}s")

    scale = float(tl_heads.abs().max())
    err = max(float((fast.patched_heads - tl_heads).abs().max()), float((fast.patched_mlp - tl_mlp).abs().max()))
    print(f"max |factlens − TL| of the patched metric: {err:.2e} (relative {err / scale:.2e}); clean metric "
          f"{fast.clean:.4f}")
    ok = err <= 1e-4 * max(scale, 1.0)
    print(f"values agree: {ok}")
    print(f"speed-up (TL time / factlens time): {t_tl / t_fast:.1f}x")
    top = fast.top(5)[["name", "pct_change"]]
    print("top senders by |% change|:\n" + top.to_string(index=False))
    if not ok:
        raise SystemExit("factlens and TransformerLens disagree")


if __name__ == "__main__":
    main()
