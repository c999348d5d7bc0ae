"""Training throughput: factlens's biography loop (plain and attention-patched) vs plain HF GPT-2 with SDPA.

All setups train the same GPT-2-architecture model (default: the ``paper`` preset shape: 8 layers, 8 heads,
d_model 512, d_mlp 2048) on the same batch, same dtype (bf16 autocast on CUDA, fp32 on CPU), AdamW (fused on
CUDA), one optimizer step = forward + backward + update. Timings are interleaved round by round so the
ratios are measured side by side in one run.

- ``hf_sdpa``: stock ``GPT2LMHeadModel`` with transformers' ``sdpa`` attention (the anchor);
- ``factlens``: :class:`factlens.bios.trainer.Trainer.train_step` (factlens attention: SDPA when unpatched);
- ``factlens_patched``: the same step with every layer's pattern patched from a frozen reference model;
- ``tl_bridge``: the same model wrapped in a TransformerLens bridge (eager attention, forced by TL).

Usage:
    python benchmarks/bench_training.py                    # CPU: batch 8
    python benchmarks/bench_training.py --batch 128 --compile   # GPU: the paper's batch, eager + compiled
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import factlens
from factlens.bios.patching.training import AttentionPatcher
from factlens.bios.trainer import MODEL_PRESETS, TrainConfig, Trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_plain(trainer: Trainer, device: torch.device):
    cfg = trainer.raw_model.config.to_dict()
    cfg["_attn_implementation"] = "sdpa"
    model = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in cfg.items() if not k.startswith("_")}),
                            ).to(device)
    model.config._attn_implementation = "sdpa"
    model.load_state_dict(trainer.raw_model.state_dict())
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused,
                            foreach=None if fused else True)
    return model, opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper", choices=sorted(MODEL_PRESETS))
    ap.add_argument("--batch", type=int, default=None, help="default 128 on GPU, 8 on CPU")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd variants")
    ap.add_argument("--no-bridge", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (128 if device.type == "cuda" else 8)
    config = TrainConfig.preset("paper", model=MODEL_PRESETS[args.preset], n_people=4096, batch_size=batch,
                                n_eval_sequences=8, n_unseen=0)
    trainer = Trainer(config, "/tmp/factlens-bench", device=device, progress=False)
    # like with like: the eager trainer cuts each batch after its longest row, the compiled one keeps seq_len
    tokens = trainer.stream.batch(0).trimmed().tokens.to(device)
    full_tokens = trainer.stream.batch(0).tokens.to(device)
    n_tokens = tokens.numel()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}), "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}, preset {args.preset}, batch {batch}, "
          f"seq {tokens.shape[1]}, vocab {trainer.vocab.size}")

    plain, plain_opt = make_plain(trainer, device)

    def plain_step(model=plain, opt=plain_opt, tokens=tokens):
        with amp:
            logits = model(tokens).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reference = factlens.build_hf("gpt2", seed=1, vocab_size=trainer.vocab.size, n_positions=trainer.seq_len,
                                  **MODEL_PRESETS[args.preset]).to(device)
    patched_trainer = Trainer(config, "/tmp/factlens-bench-p", device=device, progress=False)
    patched_trainer.patcher = AttentionPatcher(patched_trainer.raw_model, reference).install()

    setups = {"hf_sdpa": plain_step, "factlens": lambda: trainer.train_step(0),
              "factlens_patched": lambda: patched_trainer.train_step(0)}
    if args.compile:
        compiled_plain = torch.compile(plain)
        setups["hf_sdpa_compiled"] = lambda: plain_step(compiled_plain, tokens=full_tokens)
        trainer_c = Trainer(TrainConfig(**{**config.__dict__, "compile": True}), "/tmp/factlens-bench-c",
                            device=device, progress=False)
        setups["factlens_compiled"] = lambda: trainer_c.train_step(0)
        patched_c = Trainer(TrainConfig(**{**config.__dict__, "compile": True}), "/tmp/factlens-bench-pc",
                            device=device, progress=False)
        reference_c = copy.deepcopy(reference)  # a compiled reference must not be shared with another patcher
        patched_c.patcher = AttentionPatcher(patched_c.raw_model, reference_c).install()
        patched_c.patcher.reference_forward = torch.compile(reference_c)
        setups["factlens_patched_compiled"] = lambda: patched_c.train_step(0)
    if not args.no_bridge:
        bridge = factlens.bridge_from_hf(trainer.raw_model).train()
        bopt = torch.optim.AdamW(bridge.parameters(), lr=4e-4, foreach=True)

        def bridge_step():
            with amp:
                loss = bridge(tokens, return_type="loss")
            loss.backward()
            bopt.step()
            bopt.zero_grad(set_to_none=True)

        setups["tl_bridge"] = bridge_step

    for fn in setups.values():
        for _ in range(args.warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, fn in setups.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    anchor = statistics.median(times["hf_sdpa"])
    anchor_c = statistics.median(times["hf_sdpa_compiled"]) if "hf_sdpa_compiled" in times else None
    print(f"{'setup':28s} {'step ms':>9s} {'tokens/s':>10s} {'throughput vs hf_sdpa':>22s} {'vs compiled hf':>15s}")
    for name, ts in times.items():
        t = statistics.median(ts)
        vs_c = f"{anchor_c / t:15.2f}" if anchor_c else f"{'':15s}"
        print(f"{name:28s} {t * 1e3:9.1f} {n_tokens / t:10.0f} {anchor / t:22.2f} {vs_c}")


if __name__ == "__main__":
    main()
