"""OPT forward pass: SDPA when nothing is edited vs the explicit softmax path, side by side.

factlens routes a bridged OPT's attention through its registered function: with no hook on ``hook_pattern`` /
``hook_attn_scores`` it is transformers' SDPA; a hook switches that layer to the explicit path. This times the
same forward pass both ways (the explicit path forced by an identity pattern hook on every layer), interleaved,
and checks the logits agree. On a CPU the two are close; the gap (and the T² memory of materialised patterns)
is on a GPU.

Usage:
    python benchmarks/bench_opt_sdpa.py --layers 4 --d-model 512 --batch 8 --seq 256 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import factlens
from factlens.attention import PATH_COUNTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = factlens.tiny("opt", device=device, num_hidden_layers=args.layers, hidden_size=args.d_model,
                          word_embed_proj_dim=args.d_model, ffn_dim=4 * args.d_model, num_attention_heads=8,
                          max_position_embeddings=max(args.seq, 128))
    tokens = torch.randint(0, 1000, (args.batch, args.seq), device=device)
    identity = [(f"blocks.{layer}.attn.hook_pattern", lambda p, hook: p) for layer in range(args.layers)]

    def sdpa():
        return model(tokens)

    def explicit():
        with model.hooks(fwd_hooks=identity):
            return model(tokens)

    times = {"sdpa": [], "explicit": []}
    with torch.no_grad():
        for fn in (sdpa, explicit):
            fn()  # warm-up
        for _ in range(args.rounds):
            for name, fn in (("sdpa", sdpa), ("explicit", explicit)):
                PATH_COUNTS.clear()
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
                assert PATH_COUNTS[name] == args.layers, dict(PATH_COUNTS)
        diff = float((sdpa() - explicit()).abs().max())
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; OPT {args.layers} layers, "
          f"d_model {args.d_model}, batch {args.batch}, seq {args.seq}; max |logit difference| {diff:.1e}")
    base = statistics.median(times["sdpa"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:9s} median {1000 * med:8.1f} ms   time vs sdpa {med / base:.2f}")
    del out


if __name__ == "__main__":
    main()
