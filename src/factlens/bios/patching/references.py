"""Where reference attention patterns come from, and patching them into any model for analysis.

A :class:`Reference` turns tokens into post-softmax patterns ``{layer: [batch, head, q, k]}``. Sources:

- :meth:`Reference.from_checkpoint`: a biography-trainer checkpoint directory (or a run directory + step);
- :meth:`Reference.from_model`: a loaded HF GPT-2/OPT model or a TransformerLens bridge (any architecture TL
  supports: its ``hook_pattern`` is cached);
- :meth:`Reference.from_pretrained`: a model directory or hub id at a revision, booted as a bridge, e.g.
  Pythia's training checkpoints ``Reference.from_pretrained("EleutherAI/pythia-160m", revision="step3000")``
  (needs hub access; a locally saved directory works offline);
- :meth:`Reference.from_callable`: any ``fn(tokens) -> {layer: pattern}``.

:func:`patched_forward` runs a bridge with a reference's patterns through :func:`factlens.intervene`, so the
patch proves it took effect, on GPT-2 and OPT alike.

Example:
    >>> import torch, factlens
    >>> from factlens.bios.patching.references import Reference, patched_forward
    >>> model = factlens.tiny("gpt2", compat=True)
    >>> tokens = model.to_tokens("The capital of France is")
    >>> ref = Reference.from_checkpoint("runs/demo", step=1000)              # doctest: +SKIP
    >>> model = factlens.bios.run.Run("runs/demo").bridge(100)    # doctest: +SKIP
    >>> logits = patched_forward(model, tokens, ref)                         # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int

from factlens.bios.patching.training import PatternRecorder
from factlens.bios.run import reference_checkpoint
from factlens.checkpoints import load_checkpoint
from factlens.edits import patch_pattern
from factlens.errors import ArchitectureMismatchError, ConfigError, ShapeError
from factlens.intervening import intervene
from factlens.models import boot, unwrap

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel

Patterns = dict[int, Float[torch.Tensor, "batch head q k"]]


@dataclass
class Reference:
    """A source of attention patterns with a known shape (layers, heads, context)."""

    fn: Callable[[torch.Tensor], Patterns]
    n_layers: int
    n_heads: int
    n_ctx: int | None
    description: str

    def patterns(self, tokens: Int[torch.Tensor, "batch pos"]) -> Patterns:
        """Post-softmax patterns of every layer for ``tokens``."""
        if self.n_ctx is not None and tokens.shape[-1] > self.n_ctx:
            raise ConfigError(f"{self.description}: {tokens.shape[-1]} tokens exceed its context of {self.n_ctx}.")
        with torch.no_grad():
            return self.fn(tokens)

    def check_compatible(self, model: TransformerBridge | PreTrainedModel) -> None:
        """Refuse (with :class:`ArchitectureMismatchError`) a model whose layers/heads/context differ."""
        cfg = _shape_of(model)
        ours = {"layers": self.n_layers, "heads": self.n_heads}
        theirs = {"layers": cfg[0], "heads": cfg[1]}
        diffs = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
        if self.n_ctx is not None and cfg[2] is not None and self.n_ctx < cfg[2]:
            diffs["context"] = (self.n_ctx, cfg[2])
        if diffs:
            listed = ", ".join(f"{k}: reference {a} vs model {b}" for k, (a, b) in diffs.items())
            raise ArchitectureMismatchError(f"{self.description} cannot supply patterns to this model ({listed}). "
                                            "Use a reference of the same architecture.")

    # ------------------------------------------------------------------------------ sources
    @classmethod
    def from_model(cls, model: TransformerBridge | PreTrainedModel, description: str | None = None) -> Reference:
        """From an HF GPT-2/OPT model (factlens attention) or a TransformerLens bridge."""
        if hasattr(model, "run_with_cache"):  # a bridge
            names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]

            def fn(tokens: torch.Tensor) -> Patterns:
                _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=lambda n: n in names)
                return {layer: cache[name] for layer, name in enumerate(names)}

            return cls(fn, model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_ctx,
                       description or f"bridge {model.cfg.model_name}")
        model.eval()
        n_layers, n_heads, n_ctx = _shape_of(model)
        recorder = PatternRecorder(model)

        def fn(tokens: torch.Tensor) -> Patterns:
            return recorder.run(tokens)

        return cls(fn, n_layers, n_heads, n_ctx, description or f"{type(model).__name__}")

    @classmethod
    def from_checkpoint(cls, path: str | Path, step: int | None = None, device: str | torch.device = "cpu") -> Reference:
        """From a factlens training checkpoint (``.../step_0001000``) or a run directory and ``step``."""
        path = reference_checkpoint(path, step)  # a run whose checkpoints or config.json disagree is refused
        ckpt = load_checkpoint(path)
        return cls.from_model(ckpt.build_model(device), description=f"checkpoint {path}")

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: str | None = None, device: str | torch.device = "cpu",
                        **boot_kwargs) -> Reference:
        """From a hub id or local directory at an optional revision, booted as a TL bridge."""
        bridge = boot(name_or_path, device=device, revision=revision, **boot_kwargs)
        return cls.from_model(bridge, description=f"{name_or_path}@{revision or 'main'}")

    @classmethod
    def from_callable(cls, fn: Callable[[torch.Tensor], Patterns], n_layers: int, n_heads: int,
                      n_ctx: int | None = None, description: str = "callable") -> Reference:
        """From any function ``tokens -> {layer: [batch, head, q, k]}``."""
        return cls(fn, n_layers, n_heads, n_ctx, description)


def _shape_of(model) -> tuple[int, int, int | None]:
    """(layers, heads, context) of a bridge or an HF GPT-2/OPT model."""
    if hasattr(model, "cfg") and hasattr(model.cfg, "n_heads"):
        return model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_ctx
    cfg = unwrap(model).config
    return cfg.num_hidden_layers, cfg.num_attention_heads, getattr(cfg, "n_positions", None) or getattr(
        cfg, "max_position_embeddings", None)


def patched_forward(model: TransformerBridge, tokens: Int[torch.Tensor, "batch pos"], reference: Reference, *,
                    layers: int | Sequence[int] | None = None, heads: int | Sequence[int] | None = None,
                    on_no_effect: str = "raise", **forward_kwargs):
    """Run a bridge with a reference's patterns in the chosen layers/heads (verified via ``intervene``)."""
    vocab = model.cfg.d_vocab
    if tokens.numel() and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
        raise ShapeError(
            f"token ids range over [{int(tokens.min())}, {int(tokens.max())}] but the model's vocabulary has {vocab} "
            "ids: these tokens come from another tokenizer. Tokenize with the model's own, tokens = "
            "model.to_tokens(text) (load_bridge attaches a biography run's task tokenizer).")
    reference.check_compatible(model)
    patterns = reference.patterns(tokens)
    patterns = {k: v.to(model.cfg.device) for k, v in patterns.items()}
    with intervene(model, patch_pattern(model, patterns, layers=layers, heads=heads), on_no_effect=on_no_effect):
        return model(tokens.to(model.cfg.device), **forward_kwargs)
