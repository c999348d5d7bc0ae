"""The knowledge-acquisition training loop (Zucchet et al. 2025), fast, resumable and patchable.

It trains a **plain HF GPT-2-architecture model** (stock HF layers on factlens's SDPA-when-unpatched attention,
:mod:`factlens.attention`), not a TransformerLens bridge: the bridge costs 1.7-2x per step. The weights are
the same, so any checkpoint opens as a bridge for analysis (:meth:`factlens.bios.run.Run.bridge`).

- Optimiser: AdamW (β = 0.9, 0.95; weight decay 0.1 on matrices, none on biases/norms), peak LR 4e-4,
  cosine decay to 1e-7 without warm-up; bf16 autocast on CUDA; optional ``torch.compile``.
- Data: :class:`~factlens.bios.batches.BiographyStream`, a pure function of (seed, step), so a resumed run
  and DDP ranks see exactly the batches a single uninterrupted run sees.
- Data: a :class:`~factlens.bios.task.BiosTask` (population, vocabulary, stream, evaluation sets), built from
  the config alone; the memory the run needs is measured once at start-up (:mod:`factlens.bios.memory`).
- The run directory is owned (:meth:`factlens.bios.run.Run.claim`): checked before anything is written, locked
  while the run is in it. Every checkpoint records the fingerprint of the people trained on; people passed
  explicitly (``population=``) are stored in ``out/population.npz``, so readers never rebuild other people. Checkpoints (model only) on the paper's schedule under ``out/checkpoints``; resume
  checkpoints (model + optimizer + RNG) under ``out/resume``, the last ``keep_resume`` kept; metrics in
  ``out/metrics.jsonl``, truncated to the resume point when a run resumes.
- Divergence: a non-finite loss or weight stops the run at the next logging step or save with
  :class:`~factlens.errors.DivergenceError`; no non-finite checkpoint is ever written.
- Attention patching (:class:`PatchConfig`): from ``start_patching`` on, a frozen reference checkpoint's
  patterns replace the model's (:class:`~factlens.bios.patching.training.AttentionPatcher`), optionally resetting
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

import contextlib
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from factlens.bios import memory
from factlens.bios.config import (  # re-exported: the trainer's public configuration
    MODEL_PRESETS,
    RUN_PRESETS,
    PatchConfig,
    TrainConfig,
    hf_field_names,
)
from factlens.bios.data.batches import BiographyBatch
from factlens.bios.data.population import Population
from factlens.bios.finetune import init_optimizer, init_weights, pretraining_run
from factlens.bios.history import TrainingHistory
from factlens.bios.metrics_log import append_jsonl, truncate_metrics
from factlens.bios.patching.training import AttentionPatcher
from factlens.bios.run import POPULATION, Run, config_diff, pin_reference, reference_checkpoint
from factlens.bios.task import BiosTask, people_slice
from factlens.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    load_state,
    prune_checkpoints,
    save_checkpoint,
)
from factlens.errors import CheckpointError, ConfigError, DivergenceError, FactlensError
from factlens.inputs import default_device
from factlens.models import build_hf
from factlens.progress import tqdm
from factlens.resources import format_bytes, memory_usage


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


def _setup_device(device: str | torch.device | None) -> tuple[torch.device, int, int, bool]:
    """(device, rank, world size, whether this call started the process group); under ``torchrun`` each rank
    takes its local GPU."""
    device = default_device(device)
    own_dist = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if own_dist:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = _dist_info()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device, rank, world, own_dist


class Trainer:
    """One training run: a :class:`~factlens.bios.task.BiosTask`, a model, its optimiser, and the run directory.

    ``task`` defaults to ``BiosTask.build(config, population)``; without ``population``, a resumed run takes
    the people stored in its folder and a fine-tuning run the pre-training run's stored people, if any. A
    patching reference is pinned (:func:`~factlens.bios.run.pin_reference`). Nothing is written before
    :meth:`run`.
    """

    def __init__(self, config: TrainConfig, out_dir: str | Path, *, device: str | torch.device | None = None,
                 progress: bool = True, population: Population | None = None, task: BiosTask | None = None,
                 tracker=None) -> None:
        self.out = Path(out_dir)
        self.config = config = pin_reference(config)  # a reference that changed since the config was pinned: refused
        self.tracker = tracker  # factlens.bios.tracking: gets every metrics record and checkpoint step (rank 0)
        self.device, self.rank, self.world, self.own_dist = _setup_device(device)
        if config.batch_size % self.world:
            raise ConfigError(f"batch_size={config.batch_size} must be divisible by the {self.world} ranks; pass a "
                              f"multiple of {self.world}.")
        self.progress = progress and self.rank == 0
        if population is None and task is None:
            population = self._stored_people()
        self.people_given = population is not None or task is not None
        self.task = task or BiosTask.build(config, population)
        base = people_slice(self.task.population, 0, config.n_people) if config.finetune else self.task.population
        self.base_population = base  # the people before fine-tuning adds new ones: what the run stores
        self.raw_model = self._build_model()
        self.optimizer = self._make_optimizer()
        if config.finetune:
            init_optimizer(self.optimizer, config)  # fresh unless it keeps the base run's AdamW state
        self.model, self.forward = self._wrap_model()
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else None
        self.patcher = None
        self.step = 0
        self._saved_bytes = self._measure_saved_bytes(1), self._measure_saved_bytes(2)  # before any patching
        self.check_memory()
        # the reference is loaded and checked (it exists, has the step, has this architecture) before step 0
        self.patcher = self._make_patcher() if config.patch is not None else None

    # the task's parts, under the names analysis code uses
    population = property(lambda self: self.task.population)
    vocab = property(lambda self: self.task.vocab)
    seq_len = property(lambda self: self.task.seq_len)
    stream = property(lambda self: self.task.stream)

    # ------------------------------------------------------------------------------ setup
    def _build_model(self) -> torch.nn.Module:
        cfg = self.config
        model_kw = dict(cfg.model)
        model_kw.setdefault("n_positions", self.seq_len)
        model = build_hf(cfg.arch, seed=cfg.seed, vocab_size=self.vocab.size,
                         **hf_field_names(cfg.arch, model_kw)).to(self.device)
        if cfg.finetune:
            init_weights(model, cfg)
        return model

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        decay = [p for p in self.raw_model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.raw_model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused, foreach=None if fused else True)

    def _wrap_model(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(the DDP-wrapped model when there are several ranks, over the parameters that require grad now; the
        forward the step runs: compiled if asked)."""
        model = self.raw_model
        if self.world > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model, torch.compile(model) if self.config.compile else model

    def _stored_people(self) -> Population | None:
        """People stored with the run (a resumed run trained on explicit people) or with the run it fine-tunes.

        Stored people of another size are left alone: the run directory's check refuses that config anyway."""
        if (self.out / POPULATION).exists():
            stored = Population.load(self.out / POPULATION)
            return stored if len(stored) == self.config.n_people else None
        if self.config.finetune:
            base = pretraining_run(self.config)
            if (base.path / POPULATION).exists():
                return base.population()
        return None

    def _make_patcher(self) -> AttentionPatcher:
        patch = self.config.patch
        reference = load_checkpoint(reference_checkpoint(patch)).build_model(self.device)
        patcher = AttentionPatcher(self.raw_model, reference, layers=patch.layers, heads=patch.heads)
        if self.config.compile:
            patcher.reference_forward = torch.compile(reference)
        return patcher

    def sync_patching(self, step: int) -> None:
        """Install the patcher once ``step`` reaches ``start_patching`` (resetting AdamW exactly at that step if
        the config asks), as the loop does before training step ``step``; a no-op otherwise."""
        patch = self.config.patch
        if patch is None or step < patch.start_patching or (self.patcher is not None and self.patcher.installed):
            return
        self.patcher = self.patcher or self._make_patcher()
        self.patcher.install()
        if self.world > 1 and self.patcher.frozen:
            # DDP rebuilt without the q/k the patcher froze, whose gradients it would wait for forever
            self.model, self.forward = self._wrap_model()
        if step == patch.start_patching and patch.reset_optimizer:
            self.optimizer = self._make_optimizer()

    # ------------------------------------------------------------------------------ memory (start-up only)
    def _measure_saved_bytes(self, batch: int) -> int:
        """What the training forward and loss (unpatched, eager) save for backward on ``batch`` sequences."""
        def loss(tokens):
            return _loss_sum(self._logits(tokens, self.raw_model), tokens[:, 1:])

        return memory.saved_bytes(self.raw_model, loss, seq_len=self.seq_len, device=self.device,
                                  batches=(batch,))[0]

    def memory_estimate(self) -> dict[str, int]:
        """Bytes this rank needs, by part (see :func:`factlens.bios.memory.estimate`)."""
        patch = self.config.patch
        layers = None if patch is None else (len(patch.layers) if patch.layers is not None
                                             else self.raw_model.config.num_hidden_layers)
        return memory.estimate(self.raw_model, self._saved_bytes, batch=self.config.batch_size // self.world,
                               seq_len=self.seq_len, vocab_size=self.vocab.size, patched_layers=layers)

    def check_memory(self) -> None:
        """Refuse, before the first step, a run whose predictable memory exceeds what the device has free."""
        memory.check(self.memory_estimate(), self.device, patched=self.config.patch is not None)

    # ---------------------------------------------------------------------------- running
    def _logits(self, tokens: torch.Tensor, model=None) -> torch.Tensor:
        model = model or self.forward
        if self.patcher is not None and self.patcher.installed:
            self.patcher.run_reference(tokens)
        if self.amp is not None:
            with self.amp:
                return model(tokens).logits
        return model(tokens).logits

    def _on_device(self, batch: BiographyBatch) -> BiographyBatch:
        """The batch on the device; eager runs cut it after its longest row (a compiled graph keeps one shape)."""
        return (batch if self.config.compile else batch.trimmed()).to(self.device)

    def train_step(self, step: int) -> torch.Tensor:
        """One optimiser step on batch ``step``; returns the (local, detached) mean token loss."""
        batch = self._on_device(self.stream.batch(step, self.rank, self.world))
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
        """``attr_loss``, ``attr_acc``, ``top_prob`` and ``entropy`` on every evaluation set, under its prefix.

        Sets: held-out templates of the trained people (no prefix; ``old_``/``new_`` people when fine-tuning)
        and people never trained on (``unseen_``). Loss and accuracy are means over values, top-token
        probability and entropy means over value tokens, each pooled over the set's batches by its own count
        (:meth:`~factlens.bios.metrics.AttributeMetrics.combine`).
        """
        self.raw_model.eval()
        out = self.task.evaluate(lambda tokens: self._logits(tokens, self.raw_model), self._on_device)
        self.raw_model.train()
        return out

    def check_finite(self, step: int, losses: list[torch.Tensor]) -> None:
        """Raise :class:`~factlens.errors.DivergenceError` if a loss in ``losses`` or a weight is NaN/inf (one
        device sync; run at every logging step and before every save, never on the other steps)."""
        weights = torch.stack([torch.isfinite(p).all() for p in self.raw_model.parameters()]).all()
        losses_ok = torch.isfinite(torch.stack(losses)).all() if losses else torch.tensor(True)
        if bool(weights) and bool(losses_ok):
            return
        cfg = self.config
        what = "the loss" if not bool(losses_ok) else "the weights"
        last = latest_checkpoint(self.out / "resume")
        raise DivergenceError(
            f"training diverged: {what} became NaN or inf by step {step} (lr={cfg.lr}, min_lr={cfg.min_lr}, "
            f"weight_decay={cfg.weight_decay}, betas={tuple(cfg.betas)}, grad_clip={cfg.grad_clip}); nothing "
            f"non-finite was saved{f' (the last resume checkpoint is {last})' if last else ''}. Fix: lower lr "
            f"(e.g. lr={cfg.lr / 10:g}), keep 0 <= min_lr <= lr and weight_decay >= 0, or set grad_clip=1.0; then "
            "train into a new directory.")

    # -------------------------------------------------------------------------- persistence
    def _save(self, step: int, resume: bool) -> None:
        if self.rank != 0:
            return
        extra = {"seq_len": self.seq_len, "vocab_fingerprint": self.vocab.fingerprint(),
                 "population_sha256": self.base_population.fingerprint()}
        root = self.out / ("resume" if resume else "checkpoints")
        save_checkpoint(root, self.raw_model, step=step, config=self.config.to_dict(),
                        optimizer=self.optimizer if resume else None, data_seed=self.config.data_seed, extra=extra)
        if self.tracker is not None and not resume:
            self.tracker.checkpoint(step)
        if resume:
            prune_checkpoints(root, self.config.keep_resume)

    def try_resume(self) -> bool:
        """Restore the newest resume checkpoint in ``out/resume`` (if any); returns whether it did."""
        path = latest_checkpoint(self.out / "resume")
        if path is None:
            return False
        ckpt = load_checkpoint(path)
        saved, ours = TrainConfig.from_dict(ckpt.config).to_dict(), self.config.to_dict()
        if saved != ours:
            raise CheckpointError(f"{self.out} holds a run with another config (differs in {config_diff(saved, ours)}); "
                                  "use a new output directory, or the same config to resume it.")
        load_state(self.raw_model, ckpt.state, path)
        # The patcher (and, exactly at start_patching, the optimizer reset) is applied by the loop's
        # sync_patching at the resumed step, after this state is loaded, as in an uninterrupted run.
        state = ckpt.training_state()
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.step = ckpt.step
        return True

    def _storage_needed(self) -> tuple[int, str]:
        """Bytes the rest of the run writes (checkpoints still to come, resume checkpoints kept), and how."""
        cfg = self.config
        model = sum(p.numel() * p.element_size() for p in self.raw_model.state_dict().values())
        n = sum(1 for s in cfg.checkpoint_steps() if s >= self.step)
        k = min(cfg.keep_resume + 1, math.ceil(cfg.steps / cfg.resume_every) + 1)
        return n * model + 3 * k * model, (f"{n} checkpoints of {format_bytes(model)} and up to {k} resume "
                                           f"checkpoints of {format_bytes(3 * model)}")

    @contextlib.contextmanager
    def _own_run_dir(self):
        """Rank 0 checks and locks the run directory and writes its config; every rank learns whether it may go on
        (so a refused directory stops all ranks, not only rank 0)."""
        refused: FactlensError | None = None
        with contextlib.ExitStack() as stack:
            if self.rank == 0:
                try:
                    needed, what = self._storage_needed()
                    run = stack.enter_context(Run(self.out).claim(self.config, needed=needed, what=what,
                                                                  people=self.base_population.fingerprint()))
                    if self.people_given and not (run.path / POPULATION).exists():
                        self.base_population.save(run.path / POPULATION)  # readers must not rebuild other people
                except FactlensError as err:
                    refused = err
            if self.world > 1:
                verdict = [None if refused is None else f"{type(refused).__name__}: {refused}"]
                dist.broadcast_object_list(verdict, src=0)
                if verdict[0] is not None and refused is None:
                    raise CheckpointError(f"rank 0 refused the run directory: {verdict[0]}")
            if refused is not None:
                raise refused
            yield

    def _finished(self) -> bool:
        """Whether the run in the directory already ran to the end (then a re-run writes nothing)."""
        return self.step == self.config.steps and Run(self.out).finished(self.config)

    def run(self) -> TrainingHistory:
        """Train to ``config.steps`` (resuming if possible), evaluating and checkpointing on schedule."""
        with self._own_run_dir():
            self.try_resume()
            if not self._finished():
                if self.rank == 0:
                    truncate_metrics(self.out / "metrics.jsonl", self.step)
                tracker = self.tracker if self.rank == 0 else None
                if tracker is not None:
                    tracker.start(self.step)
                try:
                    self._loop()
                finally:
                    if tracker is not None:
                        tracker.close()
        if self.world > 1:
            dist.barrier()
        if self.patcher is not None:
            self.patcher.remove()
        if self.own_dist:
            dist.destroy_process_group()
        return Run(self.out).history if self.rank == 0 else None

    def _log_train(self, window: list[torch.Tensor], tokens_per_s: float) -> str:
        """Append the training record of the last ``log_every`` steps; returns the memory line for the bar."""
        mem = memory_usage(self.device)
        self._record(self.out / "metrics.jsonl", {
            "kind": "train", "step": self.step, "loss": float(torch.stack(window).mean()),
            "lr": self.optimizer.param_groups[0]["lr"], "tokens_per_s": tokens_per_s,
            "threads": torch.get_num_threads(), **mem.to_dict()})  # CPU sums follow the thread count
        return mem.short()

    def _record(self, path: Path, record: dict) -> None:
        """Append a metrics record to ``metrics.jsonl`` and hand it to the tracker, if any."""
        append_jsonl(path, record)
        if self.tracker is not None:
            self.tracker.log(record)

    def _loop(self) -> None:
        """The step loop: evaluate + checkpoint on schedule, one optimiser step, log, save a resume point."""
        cfg, metrics = self.config, self.out / "metrics.jsonl"
        schedule = set(cfg.checkpoint_steps())
        self.raw_model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc="train", unit="step")
        window: list[torch.Tensor] = []
        postfix: dict[str, str] = {}
        t0, tokens_seen = time.perf_counter(), 0
        for step in range(self.step, cfg.steps + 1):
            self.sync_patching(step)
            if step in schedule:
                self.check_finite(step, window)
                record = {"kind": "eval", "step": step, **self.evaluate()}
                if self.rank == 0:
                    self._record(metrics, record)
                    self._save(step, resume=False)
                postfix.update({k: f"{v:.3f}" for k, v in record.items() if k.endswith(("attr_loss", "attr_acc"))})
                bar.set_postfix(postfix)
            if step == cfg.steps:
                break
            window.append(self.train_step(step))
            tokens_seen += cfg.batch_size * self.seq_len
            self.step = step + 1
            if self.step % cfg.log_every == 0:
                self.check_finite(self.step, window)
                if self.rank == 0:
                    postfix["mem"] = self._log_train(window, tokens_seen / max(time.perf_counter() - t0, 1e-9))
                    bar.set_postfix(postfix, refresh=False)
                window.clear()
            if self.step % cfg.resume_every == 0 or self.step == cfg.steps:
                self.check_finite(self.step, window)
                self._save(self.step, resume=True)
            bar.update(1)
        bar.close()


def train(config: TrainConfig, out_dir: str | Path, *, device=None, progress: bool = True,
          population: Population | None = None, log_to: str | None = None) -> TrainingHistory:
    """Train (or resume) a biography run into ``out_dir``; returns its :class:`TrainingHistory`.

    ``log_to="tensorboard"`` or ``"wandb"`` also sends the metrics, checkpoint steps and config to that
    tracker (:mod:`factlens.bios.tracking`).

    Example:
        >>> from factlens.bios import TrainConfig, train
        >>> history = train(TrainConfig.preset("tiny"), "runs/tiny", progress=False)   # doctest: +SKIP
        >>> history.plot().write_html("runs/tiny/curves.html")                        # doctest: +SKIP
    """
    from factlens.bios.tracking import make_tracker

    tracker = make_tracker(log_to, out_dir, config)
    return Trainer(config, out_dir, device=device, progress=progress, population=population, tracker=tracker).run()


__all__ = ["MODEL_PRESETS", "RUN_PRESETS", "PatchConfig", "TrainConfig", "Trainer", "cosine_lr", "hf_field_names",
           "train"]
