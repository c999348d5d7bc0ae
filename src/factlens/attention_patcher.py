"""Attention-pattern patching inside a training run (Zucchet et al. 2025 §2.2), on plain HF models.

A frozen reference model runs forward on the same batch; its post-softmax attention patterns replace the
trained model's in the chosen layers and heads, with stop-gradient. The trained model keeps its own values,
outputs, MLPs and embeddings. Both models use factlens's registered attention function
(:mod:`factlens.attention`): the reference captures its patterns on the explicit path, and a fully patched
layer of the trained model computes only ``pattern @ V``. Layers that are not patched keep the SDPA path.

The patcher proves it worked: it counts, per layer, the patterns captured and consumed on every forward
(:meth:`AttentionPatcher.check_fired` raises :class:`~factlens.errors.HookDidNotFireError` otherwise), and
:meth:`AttentionPatcher.verify_effect` checks once that a patched forward differs from an unpatched one.

Example:
    >>> import torch, factlens
    >>> from factlens.attention_patcher import AttentionPatcher
    >>> model = factlens.build_hf("gpt2", seed=0); reference = factlens.build_hf("gpt2", seed=1)
    >>> patcher = AttentionPatcher(model, reference)
    >>> tokens = torch.randint(0, 1000, (2, 8))
    >>> with patcher:
    ...     logits = patcher.forward(tokens).logits
    >>> patcher.check_fired()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int

from factlens.attention import LayerEdit, set_layer_edit
from factlens.checkpoints import architecture, check_same_architecture
from factlens.errors import ConfigError, HookDidNotFireError, InterventionNoEffectError
from factlens.indices import head_indices, layer_indices
from factlens.models import unwrap

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def attention_modules(hf_model: PreTrainedModel) -> list[torch.nn.Module]:
    """The per-layer HF attention modules of a GPT-2 or OPT model (unwrapping DDP / torch.compile)."""
    m = unwrap(hf_model)
    if m.config.model_type == "gpt2":
        return [block.attn for block in m.transformer.h]
    if m.config.model_type == "opt":
        return [layer.self_attn for layer in m.model.decoder.layers]
    raise ConfigError(f"attention patching supports GPT-2 and OPT models, got {m.config.model_type!r}.")


def _config(model):
    return unwrap(model).config


class AttentionPatcher:
    """Replace a trained model's attention patterns with a frozen reference's, layer by layer.

    Args:
        model: the HF model being trained (GPT-2 or OPT, factlens attention).
        reference: a frozen HF model of the same architecture (e.g. a reference checkpoint).
        layers: layers to patch (default all). heads: heads to patch (default all).
    """

    def __init__(self, model, reference, *, layers: Sequence[int] | None = None,
                 heads: Sequence[int] | None = None) -> None:
        check_same_architecture(architecture(_config(reference)), architecture(_config(model)))
        self.model, self.reference = model, reference
        n_layers = len(attention_modules(model))
        n_heads = _config(model).num_attention_heads
        self.layers = layer_indices(n_layers, layers)
        heads = head_indices(n_heads, heads)
        self.heads = None if heads is None or len(heads) == n_heads else heads
        self._slots: dict[int, torch.Tensor | None] = dict.fromkeys(self.layers)
        self.captured = dict.fromkeys(self.layers, 0)
        self.consumed = dict.fromkeys(self.layers, 0)
        self.installed = False
        reference.eval().requires_grad_(False)
        # built once, so a compiled reference forward sees the same functions every step (no recompiles)
        self._capture_edits = {layer: LayerEdit(pattern_fn=self._capture(layer)) for layer in self.layers}
        # replaced by torch.compile(reference) for compiled training; a compiled reference must belong to one
        # patcher (another patcher's capture edits would invalidate its graph and force recompiles)
        self.reference_forward = reference

    # ------------------------------------------------------------------------------------ edits
    def _capture(self, layer: int):
        def fn(pattern: torch.Tensor) -> torch.Tensor:
            # only a tensor is stored here: counting happens outside (a compiled reference would otherwise
            # specialise on the counter's value and recompile every step)
            self._slots[layer] = pattern.detach()
            return pattern
        return fn

    def _take(self, layer: int) -> torch.Tensor:
        # No Python state is mutated here when compiling: torch.compile traces this into the model's graph.
        pattern = self._slots[layer]
        if pattern is None:
            raise HookDidNotFireError(f"layer {layer}: no reference pattern was captured for this forward; call "
                                      "patcher.forward(tokens) (it runs the reference first).")
        if not torch.compiler.is_compiling():
            self.consumed[layer] += 1
        return pattern

    def _edit(self, layer: int, device: torch.device) -> LayerEdit:
        if self.heads is None:
            return LayerEdit(replace=lambda: self._take(layer))
        head_mask = torch.zeros(_config(self.model).num_attention_heads, dtype=torch.bool, device=device)
        head_mask[self.heads] = True
        return LayerEdit(pattern_fn=lambda own: torch.where(head_mask[None, :, None, None], self._take(layer), own))

    def install(self) -> AttentionPatcher:
        """Install the replace edits on the model (the reference is hooked only while it runs)."""
        device = next(self.model.parameters()).device
        mods = attention_modules(self.model)
        for layer in self.layers:
            set_layer_edit(mods[layer], self._edit(layer, device))
        self.installed = True
        return self

    def remove(self) -> None:
        """Remove every edit: the model is back on the plain SDPA path."""
        for mod in attention_modules(self.model):
            set_layer_edit(mod, None)
        for layer in self.layers:
            self._slots[layer] = None
        self.installed = False

    def __enter__(self) -> AttentionPatcher:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---------------------------------------------------------------------------------- running
    @torch.no_grad()
    def run_reference(self, input_ids: Int[torch.Tensor, "batch pos"]) -> None:
        """Run the frozen reference on the batch, capturing its patterns for the next model forward."""
        for layer in self.layers:  # stale patterns of an earlier batch are never reused (reset in place)
            self._slots[layer] = None
        ref_mods = attention_modules(self.reference)
        # capture edits exist only while this patcher runs the reference, so a reference model can be shared
        try:
            for layer in self.layers:
                set_layer_edit(ref_mods[layer], self._capture_edits[layer])
            self.reference_forward(input_ids)
        finally:
            for layer in self.layers:
                set_layer_edit(ref_mods[layer], None)
        for layer in self.layers:
            if self._slots[layer] is not None:
                self.captured[layer] += 1

    def mark_consumed(self) -> None:
        """Count one patched forward on every layer (for compiled models, whose traced code cannot count)."""
        for layer in self.layers:
            self.consumed[layer] = self.captured[layer]

    def forward(self, input_ids: Int[torch.Tensor, "batch pos"], **kwargs):
        """Reference forward (no grad), then the patched model forward; returns the model's output."""
        if not self.installed:
            raise ConfigError("the patcher is not installed; use `with patcher:` or patcher.install().")
        self.run_reference(input_ids)
        return self.model(input_ids, **kwargs)

    def check_fired(self) -> None:
        """Raise unless every patched layer captured and consumed the same number of patterns (> 0)."""
        for layer in self.layers:
            if self.consumed[layer] == 0 or self.consumed[layer] != self.captured[layer]:
                raise HookDidNotFireError(
                    f"attention patching on layer {layer}: {self.captured[layer]} reference patterns captured, "
                    f"{self.consumed[layer]} consumed. The model's attention does not route through factlens "
                    "(build it with factlens.build_hf or call factlens.attention.use_factlens_attention)."
                )

    @torch.no_grad()
    def verify_effect(self, input_ids: Int[torch.Tensor, "batch pos"], atol: float = 0.0) -> float:
        """Check once that patching changes the model's logits; returns the max |Δlogit|."""
        was_installed = self.installed
        self.remove()
        plain = self.model(input_ids).logits
        self.install()
        patched = self.forward(input_ids).logits
        if not was_installed:
            self.remove()
        delta = float((patched.float() - plain.float()).abs().max())
        if delta <= atol:
            raise InterventionNoEffectError(
                "attention patching left the logits unchanged: the reference's patterns equal the model's own "
                "(same weights?). Patch from a different checkpoint, or skip the check."
            )
        return delta
