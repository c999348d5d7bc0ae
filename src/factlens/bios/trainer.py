"""The knowledge-acquisition training loop (Zucchet et al. 2025), fast, resumable and patchable.

It trains a **plain HF GPT-2-architecture model** (stock HF layers on factlens's SDPA-when-unpatched attention,
:mod:`factlens.attention`), not a TransformerLens bridge: the bridge costs 1.7-2x per step. The weights are
the same, so any checkpoint opens as a bridge for analysis (:func:`factlens.bios.runs.load_bridge`).

- Optimiser: AdamW (β = 0.9, 0.95; weight decay 0.1 on matrices, none on biases/norms), peak LR 4e-4,
  cosine decay to 1e-7 without warm-up; bf16 autocast on CUDA; optional ``torch.compile``.
- Data: :class:`~factlens.bios.data.batches.BiographyStream`, a pure function of (seed, step), so a resumed run
  and DDP ranks see exactly the batches a single uninterrupted run sees.
- Checkpoints (model only) on the paper's schedule under ``out/checkpoints``; a resume checkpoint (model +
  optimizer + scheduler) under ``out/resume``, overwritten atomically; metrics in ``out/metrics.jsonl``.
- Attention patching (:class:`PatchConfig`): from ``start_patching`` on, a frozen reference checkpoint's
  patterns replace the model's (:class:`~factlens.attention_patcher.AttentionPatcher`), optionally resetting
  the optimizer state as the paper does.
- Multi-GPU: run under ``torchrun``; DDP with NCCL (GPU) or gloo (CPU); the loss is normalised by the global
  token count, so N ranks reproduce the single-process step.

Architecture note: the paper's model is Chinchilla-style (RMSNorm, Transformer-XL relative positions). factlens
uses the GPT-2 architecture of the same shape (LayerNorm, learned positions) so TransformerLens's hook names
apply; the ``paper`` preset has 8 layers, 8 heads, d_model 512, d_mlp 2048, head dim 64.

Example:
    >>> from factlens.bios.trainer import TrainConfig, train
    >>> run = train(TrainConfig.preset("tiny", steps=20), "runs/tiny", progress=False)   # doctest: +SKIP
    >>> run.final["attr_loss"]                                                           # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from factlens.attention_patcher import AttentionPatcher
from factlens.bios import finetune
from factlens.bios.config import (  # re-exported: the trainer's public configuration
    MODEL_PRESETS,
    RUN_PRESETS,
    PatchConfig,
    TrainConfig,
    hf_field_names,
)
from factlens.bios.data.batches import BiographyStream, eval_batches
from factlens.bios.data.population import Population
from factlens.bios.data.samplers import make_sampler
from factlens.bios.data.vocab import BiosVocab
from factlens.bios.finetune import init_weights, people_slice
from factlens.bios.history import TrainingHistory, append_jsonl, truncate_jsonl
from factlens.bios.metrics import attribute_accuracy, attribute_loss, hallucination_metrics
from factlens.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    load_state,
    save_checkpoint,
)
from factlens.errors import CheckpointError, ConfigError
from factlens.models import build_hf
from factlens.resources import check_fits, format_bytes, memory_usage, saved_tensor_bytes


class _PaddingNoticeFilter(logging.Filter):
    """Hide HF's "pass an attention_mask" notice: batches are right-padded and the model is causal, so pad
    tokens never influence real ones, and omitting the mask keeps SDPA on its ``is_causal`` fast path."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "attention_mask" not in record.getMessage()


for _name in ("transformers.modeling_utils", "transformers.utils.generic"):
    logging.getLogger(_name).addFilter(_PaddingNoticeFilter())


def _loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy: ``logits`` [b, p, v], ``targets`` [b, p-1] (-100 = padding)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                             ignore_index=-100, reduction="sum")


def cosine_lr(step: int, total: int, lr: float, min_lr: float) -> float:
    """Cosine decay from ``lr`` at step 0 to ``min_lr`` at ``total``, no warm-up."""
    t = min(max(step, 0), total) / max(total, 1)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _maybe_init_dist(device: torch.device) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return True
    return False


class Trainer:
    """One training run: model, optimiser, data, evaluation and checkpoints. See :func:`train`."""

    def __init__(self, config: TrainConfig, out_dir: str | Path, *, device: str | torch.device | None = None,
                 progress: bool = True, population: Population | None = None) -> None:
        self.config, self.out = config, Path(out_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' requested but CUDA is not available; pass device='cpu'.")
        self.own_dist = _maybe_init_dist(self.device)
        self.rank, self.world = _dist_info()
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        if config.batch_size % self.world:
            raise ConfigError(f"batch_size={config.batch_size} must be divisible by the {self.world} ranks.")
        self.progress = progress and self.rank == 0
        self.population = population or Population.generate(config.n_people, seed=config.data_seed,
                                                             pools=config.make_pools())
        if len(self.population) != config.n_people:
            raise ConfigError(f"the population has {len(self.population)} people, the config says {config.n_people}.")
        self.vocab = BiosVocab(self.population.pools)
        self.seq_len = config.validate(self.vocab.max_biography_tokens())
        if config.finetune:
            self.population, sampler, groups = finetune.setup(config, self.population)
        else:
            sampler = make_sampler(config.sampler, n=config.n_people, batch_size=config.batch_size)
            groups = {"": (0, len(self.population))}
        self.stream = BiographyStream(self.population, self.vocab, sampler, config.batch_size, self.seq_len,
                                      seed=config.data_seed)
        self.eval_groups = {
            prefix: eval_batches(people_slice(self.population, lo, hi), self.vocab, config.n_eval_sequences, config.eval_batch_size,
                                 self.seq_len, seed=config.data_seed)
            for prefix, (lo, hi) in groups.items()}
        self.unseen_set = []
        if config.n_unseen:
            unseen = self.population.unseen(config.n_unseen, seed=config.data_seed + 1)
            self.unseen_set = eval_batches(unseen, self.vocab, config.n_unseen, config.eval_batch_size,
                                           self.seq_len, seed=config.data_seed + 1, split="train")
        model_kw = dict(config.model)
        model_kw.setdefault("n_positions", self.seq_len)
        self.model = build_hf(config.arch, seed=config.seed, vocab_size=self.vocab.size,
                              **hf_field_names(config.arch, model_kw)).to(self.device)
        self.raw_model = self.model
        if config.finetune:
            init_weights(self.raw_model, config)
        self.patcher = None
        self.step = 0
        self.optimizer = self._make_optimizer()
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else None
        self._wrap()
        self._saved_bytes = (self._measure_saved_bytes(1), self._measure_saved_bytes(2))  # before any patching
        self.check_memory()
        # the reference is loaded and checked (it exists, has the step, has this architecture) before step 0
        self.patcher = self._make_patcher() if config.patch is not None else None

    # ------------------------------------------------------------------------------ memory
    def memory_estimate(self) -> dict[str, int]:
        """Bytes this rank needs: weights, gradients, AdamW state, the activations saved for backward, the
        logits and, when the run patches attention, the reference model and its captured patterns.

        The activations are measured, not modelled: the training forward runs on batches of 1 and 2 with
        every tensor autograd saves counted (:func:`~factlens.resources.saved_tensor_bytes`), and the count is
        extrapolated linearly to this rank's batch (every saved tensor is per-sequence or fixed; on GPT-2 and
        OPT the extrapolation over-predicts a direct measurement by under 0.05%). The rest are fp32 upper
        bounds. ``torch.compile`` saves less than this eager measurement.
        """
        cfg = self.config
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        b, t = cfg.batch_size // self.world, self.seq_len
        one, two = self._saved_bytes
        est = {"weights + gradients + AdamW": 16 * n_params,
               "activations saved for backward": one + (two - one) * (b - 1),
               # the logits, their flattened copy and two gradients live at once at the start of backward
               "logits (copies and gradients in the loss)": 4 * 4 * b * t * self.vocab.size}
        if cfg.patch is not None:
            mcfg = self.raw_model.config
            n_layers = len(cfg.patch.layers) if cfg.patch.layers is not None else mcfg.num_hidden_layers
            est["reference model"] = 4 * n_params
            est["reference patterns"] = 4 * b * n_layers * mcfg.num_attention_heads * t * t
        return est

    def _measure_saved_bytes(self, batch: int) -> int:
        """What the training forward and loss (unpatched, eager) save for backward on ``batch`` sequences; the
        RNG is forked, so the run's randomness is untouched."""
        tokens = torch.zeros(batch, self.seq_len, dtype=torch.long, device=self.device)
        was_training = self.raw_model.training
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.raw_model.train()  # dropout masks are saved too
            try:
                return saved_tensor_bytes(lambda: _loss_sum(self._logits(tokens, self.raw_model), tokens[:, 1:]),
                                          exclude=self.raw_model.parameters())
            finally:
                self.raw_model.train(was_training)

    def check_memory(self) -> None:
        """Refuse, before the first step, a run whose predictable memory exceeds what the device has free."""
        est = self.memory_estimate()
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in est.items())
        fixes = ["a smaller batch_size", "a smaller model (TrainConfig.model)"]
        if self.config.patch is not None:
            fixes.insert(1, "patch fewer layers (PatchConfig.layers)")
        if self.device.type == "cuda":
            fixes.append("more GPUs (torchrun splits the batch across ranks)")
        check_fits(sum(est.values()), self.device, what=f"training ({parts})", fixes=fixes)

    # ------------------------------------------------------------------------------ setup
    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        decay = [p for p in self.raw_model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.raw_model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused, foreach=None if fused else True)

    def _wrap(self) -> None:
        """DDP (over the parameters that require grad now) and ``torch.compile`` around the raw model."""
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.raw_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.forward = torch.compile(self.model) if self.config.compile else self.model

    def _make_patcher(self):
        patch = self.config.patch
        ckpt = load_checkpoint(patch.checkpoint_dir())
        reference = ckpt.build_model(self.device)
        patcher = AttentionPatcher(self.raw_model, reference, layers=patch.layers, heads=patch.heads)
        if self.config.compile:
            patcher.reference_forward = torch.compile(reference)
        return patcher

    def _patching_active(self, step: int) -> bool:
        return self.config.patch is not None and step >= self.config.patch.start_patching

    def _sync_patching(self, step: int) -> None:
        """Install the patcher once ``step`` reaches ``start_patching`` (resetting AdamW if asked)."""
        if not self._patching_active(step) or (self.patcher is not None and self.patcher.installed):
            return
        self.patcher = self.patcher or self._make_patcher()
        self.patcher.install()
        if self.world > 1 and self.patcher.frozen:
            self._wrap()  # DDP rebuilt without the q/k it froze, whose gradients it would wait for forever
        if step == self.config.patch.start_patching and self.config.patch.reset_optimizer:
            self.optimizer = self._make_optimizer()

    # ---------------------------------------------------------------------------- running
    def _logits(self, tokens: torch.Tensor, model=None) -> torch.Tensor:
        model = model or self.forward
        if self.patcher is not None and self.patcher.installed:
            self.patcher.run_reference(tokens)
        if self.amp is not None:
            with self.amp:
                return model(tokens).logits
        return model(tokens).logits

    def train_step(self, step: int) -> torch.Tensor:
        """One optimiser step on batch ``step``; returns the (local, detached) mean token loss."""
        batch = self.stream.batch(step, self.rank, self.world).to(self.device)
        targets = batch.tokens[:, 1:].masked_fill(~batch.attention_mask[:, 1:], -100)  # [b, p-1]
        n_local = (targets != -100).sum()
        n_global = n_local.clone()
        if self.world > 1:
            dist.all_reduce(n_global)
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(step, self.config.steps, self.config.lr, self.config.min_lr)
        logits = self._logits(batch.tokens)  # [b, p, v]
        loss_sum = _loss_sum(logits, targets)
        (loss_sum * self.world / n_global).backward()  # DDP averages over ranks: global token mean
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.patcher is not None and self.patcher.installed:
            if self.config.compile:  # the compiled graph cannot count; every captured pattern was used by it
                self.patcher.mark_consumed()
            self.patcher.check_fired()
        return (loss_sum / n_local).detach()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Attribute loss/accuracy on held-out templates; hallucination metrics on unseen people."""
        self.raw_model.eval()
        out: dict[str, float] = {}
        for prefix, batches in [*self.eval_groups.items(), ("unseen_", self.unseen_set)]:
            totals: dict[str, float] = {}
            n = 0
            for batch in batches:
                batch = batch.to(self.device)
                logits = self._logits(batch.tokens, self.raw_model).float()
                stats = {"attr_loss": float(attribute_loss(logits, batch)),
                         "attr_acc": float(attribute_accuracy(logits, batch))}
                if prefix == "unseen_":
                    summary = hallucination_metrics(logits, batch)
                    stats.update(top_prob=float(summary["top_prob"]), entropy=float(summary["entropy"]))
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v * len(batch)
                n += len(batch)
            out.update({prefix + k: v / n for k, v in totals.items()} if n else {})
        self.raw_model.train()
        return out

    # -------------------------------------------------------------------------- persistence
    def _save(self, step: int, resume: bool) -> None:
        if self.rank != 0:
            return
        extra = {"seq_len": self.seq_len, "vocab_fingerprint": self.vocab.fingerprint}
        if resume:
            save_checkpoint(self.out / "resume", self.raw_model, step=step, config=self.config.to_dict(),
                            optimizer=self.optimizer, data_seed=self.config.data_seed, extra=extra)
        else:
            save_checkpoint(self.out / "checkpoints", self.raw_model, step=step, config=self.config.to_dict(),
                            data_seed=self.config.data_seed, extra=extra)

    def try_resume(self) -> bool:
        """Restore the newest resume checkpoint in ``out/resume`` (if any); returns whether it did."""
        path = latest_checkpoint(self.out / "resume")
        if path is None:
            return False
        ckpt = load_checkpoint(path)
        saved = TrainConfig.from_dict(ckpt.config).to_dict()
        if saved != self.config.to_dict():
            diff = [k for k in saved if saved[k] != self.config.to_dict().get(k)]
            raise CheckpointError(f"{self.out} holds a run with another config (differs in {diff}); use a new "
                                  "output directory or the same config to resume.")
        load_state(self.raw_model, ckpt.state, path)
        # The patcher (and, exactly at start_patching, the optimizer reset) is applied by the loop's
        # _sync_patching at the resumed step, after this state is loaded, as in an uninterrupted run.
        state = ckpt.training_state()
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.step = ckpt.step
        return True

    def run(self) -> TrainingHistory:
        """Train to ``config.steps`` (resuming if possible), evaluating and checkpointing on schedule."""
        cfg = self.config
        metrics_path = self.out / "metrics.jsonl"
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        resumed = self.try_resume()
        if self.rank == 0:
            truncate_jsonl(metrics_path, self.step if resumed else -1)
        schedule = set(cfg.checkpoint_steps())
        self.raw_model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc="train", unit="step")
        window: list[torch.Tensor] = []
        postfix: dict[str, str] = {}
        t0, tokens_seen = time.perf_counter(), 0
        for step in range(self.step, cfg.steps + 1):
            self._sync_patching(step)
            if step in schedule:
                record = {"kind": "eval", "step": step, **self.evaluate()}
                if self.rank == 0:
                    append_jsonl(metrics_path, record)
                    self._save(step, resume=False)
                postfix.update({k: f"{v:.3f}" for k, v in record.items() if k.endswith(("attr_loss", "attr_acc"))})
                bar.set_postfix(postfix)
            if step == cfg.steps:
                break
            window.append(self.train_step(step))
            tokens_seen += cfg.batch_size * self.seq_len
            self.step = step + 1
            if self.step % cfg.log_every == 0 and self.rank == 0:
                elapsed, mem = time.perf_counter() - t0, memory_usage(self.device)
                append_jsonl(metrics_path, {"kind": "train", "step": self.step, "loss": float(torch.stack(window).mean()),
                                            "lr": self.optimizer.param_groups[0]["lr"],
                                            "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                                            **mem.to_dict()})
                postfix["mem"] = mem.short()
                bar.set_postfix(postfix, refresh=False)
                window.clear()
            if self.step % cfg.resume_every == 0 or self.step == cfg.steps:
                self._save(self.step, resume=True)
            bar.update(1)
        bar.close()
        if self.world > 1:
            dist.barrier()
        if self.patcher is not None:
            self.patcher.remove()
        if self.own_dist:
            dist.destroy_process_group()
        return TrainingHistory.load(self.out) if self.rank == 0 else None


def train(config: TrainConfig, out_dir: str | Path, *, device=None, progress: bool = True,
          population: Population | None = None) -> TrainingHistory:
    """Train (or resume) a biography run into ``out_dir``; returns its :class:`TrainingHistory`.

    Example:
        >>> history = train(TrainConfig.preset("tiny"), "runs/tiny", progress=False)   # doctest: +SKIP
        >>> history.plot().write_html("runs/tiny/curves.html")                        # doctest: +SKIP
    """
    return Trainer(config, out_dir, device=device, progress=progress, population=population).run()


__all__ = ["MODEL_PRESETS", "RUN_PRESETS", "PatchConfig", "TrainConfig", "Trainer", "cosine_lr", "hf_field_names",
           "train"]
