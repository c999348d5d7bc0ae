"""The kernels behind ``capitals analyze`` and the biography trainer: each new path beside the old one.

Three changes, each timed side by side in this one process, on the same inputs, with the largest difference
between the two outputs:

1. **Chunking of the prompt passes** (``run_at_end``): old, chunks of 64 prompts in dataset order, each cut
   after its longest prompt, and full-vocabulary logits at every position when only activations were asked
   for; new, chunks of prompts sorted by length (less padding, logits at one or two ``end`` columns) and the
   unembedding on one position when no logits are wanted.
2. **Path patching's head deltas** (pass C's ``(z̄ − z_clean)·W_O[h]`` for every row of a 1,024-row chunk):
   old, one batched mat-vec over a gathered ``[rows, d_head, d_model]`` copy of ``W_O``; new, one matmul per
   sender in the chunk.
3. **GPT-2's ``gelu_new``**: HF's element-wise ``NewGELUActivation`` against ``GELUTanh`` (one kernel, the
   same function), in a bridge forward and in a demo-preset training step.

Usage:
    python benchmarks/bench_analysis_kernels.py --model gpt2 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time

import torch
from transformers.activations import GELUTanh, NewGELUActivation

import factlens
from factlens.recall.datasets import dataset_for
from factlens.recall.forward import _at_end, run_at_end
from factlens.recall.path_patching import _head_deltas


def best(fn, repeats: int) -> tuple[float, object]:
    """The fastest of ``repeats`` wall-clock runs of ``fn()`` and its last result."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def row(name: str, old: float, new: float, diff: float | None = None) -> None:
    extra = "" if diff is None else f"   max |new − old| {diff:.1e}"
    print(f"{name:<46} old {old:7.3f} s   new {new:7.3f} s   old/new {old / new:5.2f}x{extra}")


def old_run_at_end(model, dataset, names, logits: bool, max_batch: int = 64):
    """``run_at_end`` as it was: chunks in dataset order; without logits, full logits were computed anyway."""
    stored = {name: [] for name in names}
    out_logits = []
    for start in range(0, len(dataset), max_batch):
        rows = torch.arange(start, min(start + max_batch, len(dataset)))
        ends = dataset.end[rows]
        tokens = dataset.tokens[rows, : int(ends.max()) + 1]
        fwd = [(name, lambda t, hook, name=name, ends=ends: stored[name].append(
            _at_end(name, t, ends, dataset.tokens.shape[1]))) for name in names]
        keep = torch.unique(ends)
        kwargs = {"logits_to_keep": keep} if logits else {"return_type": None}
        with torch.no_grad(), model.hooks(fwd_hooks=fwd):
            out = model(tokens, **kwargs)
        if logits:
            out_logits.append(out[torch.arange(len(rows)), torch.searchsorted(keep, ends)])
    return (torch.cat(out_logits) if logits else None), {k: torch.cat(v) for k, v in stored.items()}


def bench_chunking(model, ds, repeats: int) -> None:
    L = model.cfg.n_layers
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(L)] + [f"blocks.{layer}.hook_mlp_out" for layer in range(L)]
    for logits in (False, True):
        t_old, (lg_old, acts_old) = best(lambda lg=logits: old_run_at_end(model, ds, names, lg), repeats)
        t_new, run = best(lambda lg=logits: run_at_end(model, ds, names, logits=lg), repeats)
        diff = max(float((run[k] - acts_old[k]).abs().max()) for k in names)
        if logits:
            diff = max(diff, float((run.logits - lg_old).abs().max()))
        row(f"prompt pass ({len(ds)} prompts, logits={logits})", t_old, t_new, diff)


def bench_head_delta(model, ds, repeats: int, rows: int = 1024) -> None:
    L, H, dh = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head
    n = len(ds)
    g = torch.Generator().manual_seed(0)
    z_clean, z_mean = torch.randn(n, L, H, dh, generator=g), torch.randn(L, H, dh, generator=g)
    W_O = torch.stack([model.blocks[layer].attn.W_O.detach() for layer in range(L)])  # [L, H, dh, d]
    senders = [(layer, h) for layer in range(L) for h in range(H)]
    named = [("head", layer, h) for layer, h in senders]
    chunks = []  # the head rows of pass C, sender-major, in chunks of ``rows``
    total = len(senders) * n
    for start in range(0, total, rows):
        flat = torch.arange(start, min(start + rows, total))
        chunks.append((flat // n, flat % n))
    s_layer = torch.tensor([s[0] for s in senders])
    s_head = torch.tensor([s[1] for s in senders])

    def old():
        out = []
        for s_idx, p_idx in chunks:
            lh, hh = s_layer[s_idx], s_head[s_idx]
            out.append(torch.einsum("rk,rkd->rd", z_mean[lh, hh] - z_clean[p_idx, lh, hh], W_O[lh, hh]))
        return out

    def new():  # the library's own code
        return [_head_deltas(named, s_idx, p_idx, z_mean, z_clean, W_O) for s_idx, p_idx in chunks]

    t_old, a = best(old, repeats)
    t_new, b = best(new, repeats)
    row(f"pass C head deltas ({total:,} rows)", t_old, t_new, max(float((x - y).abs().max()) for x, y in zip(a, b)))


def set_gelu(module, cls) -> None:
    """Put ``cls()`` (``NewGELUActivation``: HF's element-wise one; ``GELUTanh``: fused) in every GPT-2 MLP."""
    for sub in module.modules():
        if isinstance(getattr(sub, "act", None), (GELUTanh, NewGELUActivation)):
            sub.act = cls()


def bench_gelu(model, ds, repeats: int) -> None:
    tokens = ds.tokens[:64, : int(ds.end[:64].max()) + 1]
    out = {}
    with torch.no_grad():
        for name, cls in (("old", NewGELUActivation), ("new", GELUTanh)):
            set_gelu(model.original_model, cls)
            out[name] = best(lambda: model(tokens), repeats)
    row("bridge forward (64 prompts, gelu_new)", out["old"][0], out["new"][0],
        float((out["old"][1] - out["new"][1]).abs().max()))

    from factlens.bios.config import TrainConfig
    from factlens.bios.trainer import Trainer

    out = tempfile.mkdtemp()
    try:
        trainer = Trainer(TrainConfig.preset("demo", steps=1000), out, progress=False)
        for step in range(3):  # warm-up
            trainer.train_step(step)
        times = {"old": [], "new": []}
        for _ in range(max(repeats, 2)):  # alternating, on the same 20 batches (a step's cost depends on its batch)
            for name, cls in (("old", NewGELUActivation), ("new", GELUTanh)):
                set_gelu(trainer.raw_model, cls)
                t = time.perf_counter()
                for step in range(3, 23):
                    trainer.train_step(step)
                times[name].append((time.perf_counter() - t) / 20)
        times = {name: min(ts) for name, ts in times.items()}
        row("demo-preset training step (batch 32)", times["old"], times["new"])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; best of {args.repeats}")
    model = factlens.full_size(args.model, compat=True)
    ds = dataset_for(model)
    with torch.no_grad():  # warm-up: the first forward of a process allocates and is not timed
        model(ds.tokens[:64])
    bench_chunking(model, ds, args.repeats)
    bench_head_delta(model, ds, args.repeats)
    bench_gelu(model, ds, args.repeats)


if __name__ == "__main__":
    main()
