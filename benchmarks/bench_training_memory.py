"""How well the trainer's memory check predicts what a training step really takes.

For each preset, in a fresh process (so one preset's peak cannot hide another's): build the trainer, read
``Trainer.memory_estimate()``, run one optimiser step, and compare the process's peak memory rise over the
step (RSS on the CPU, ``max_memory_allocated`` on a GPU) with the predicted rise: activations saved for
backward + the logits term + gradients and AdamW state (the weights are resident before the step).

Usage:
    python benchmarks/bench_training_memory.py --presets tiny demo small paper
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

_CHILD = """
import json, sys, tempfile, time, torch
from factlens.bios.trainer import Trainer, TrainConfig
from factlens.resources import memory_usage
name, device = sys.argv[1], sys.argv[2]
with tempfile.TemporaryDirectory() as out:
    trainer = Trainer(TrainConfig.preset(name), out, progress=False, device=device)
    t0 = time.perf_counter()
    trainer._measure_saved_bytes(1), trainer._measure_saved_bytes(2)  # the activation probe, timed on its own
    probe_s = time.perf_counter() - t0
    est = trainer.memory_estimate()
    trainer.raw_model.train()
    if device == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    before = memory_usage(device)
    t0 = time.perf_counter()
    trainer.train_step(0)
    if device == "cuda":
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t0
    after = memory_usage(device)
    n_params = sum(p.numel() for p in trainer.raw_model.parameters())
    rise = (after.cuda_peak - before.cuda_allocated) if device == "cuda" else (after.peak_rss - before.rss)
    predicted = sum(v for k, v in est.items() if not k.startswith("weights")) + 12 * n_params
    print(json.dumps(dict(preset=name, batch=trainer.config.batch_size, seq_len=trainer.seq_len,
                          params_m=n_params / 1e6, estimate=est, predicted_rise=predicted, measured_rise=rise,
                          probe_s=probe_s, step_s=step_s)))
"""


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "demo", "small", "paper"])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = ap.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}")
    print("| preset | batch × len | params | activations (pred.) | predicted rise | measured rise | measured / predicted "
          "| probe | step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.presets:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _CHILD, name, device], capture_output=True, text=True)
        if proc.returncode:
            print(f"| {name} | failed: {proc.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        acts = r["estimate"]["activations saved for backward"]
        print(f"| {name} | {r['batch']} × {r['seq_len']} | {r['params_m']:.1f} M | {gib(acts)} GiB "
              f"| {gib(r['predicted_rise'])} GiB | {gib(r['measured_rise'])} GiB "
              f"| {r['measured_rise'] / r['predicted_rise']:.2f} | {r['probe_s']:.2f} s | {r['step_s']:.1f} s |")
        print(f"  ({name}: {time.perf_counter() - t0:.0f} s in all)", file=sys.stderr)


if __name__ == "__main__":
    main()
