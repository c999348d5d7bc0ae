"""Attention-pattern patching inside a training run (Zucchet et al. 2025 §2.2), on plain HF models.

A frozen reference model runs forward on the same batch; its post-softmax attention patterns replace the
trained model's in the chosen layers and heads, with stop-gradient. The trained model keeps its own values,
outputs, MLPs and embeddings. Both models use factlens's registered attention function
(:mod:`factlens.attention`): the reference records its patterns on the explicit path (:class:`PatternRecorder`,
the one capture implementation), and a fully patched layer of the trained model computes only ``pattern @ V``.
Layers that are not patched keep the SDPA path.

A fully patched layer's W_Q and W_K get no gradient. Where they are parameters of their own (OPT's ``q_proj``
and ``k_proj``), :meth:`AttentionPatcher.install` freezes them and :meth:`AttentionPatcher.remove` unfreezes
them, so a DDP wrapper built after installing does not wait for gradients that never come (the biography
trainer rebuilds its wrapper when patching starts). GPT-2's fused ``c_attn`` keeps training its value columns;
its q/k columns receive zero gradients instead. The reference must be another model: the trainee itself, or a
model sharing its parameters, is refused (patching would freeze the trainee).

The patcher proves it worked: it counts, per layer, the patterns captured and consumed on every forward
(:meth:`AttentionPatcher.check_fired` raises :class:`~factlens.errors.HookDidNotFireError` otherwise), and
:meth:`AttentionPatcher.verify_effect` checks once that a patched forward differs from an unpatched one.

Example:
    >>> import torch, factlens
    >>> from factlens.bios.patching.training import AttentionPatcher
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
from jaxtyping import Float, Int

from factlens.attention import LayerEdit, set_layer_edit, use_factlens_attention
from factlens.checkpoints import architecture, check_same_architecture
from factlens.errors import (
    ArchitectureMismatchError,
    ConfigError,
    HookDidNotFireError,
    InterventionNoEffectError,
)
from factlens.indices import head_indices, layer_indices
from factlens.inputs import at_least_fp32
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


_ARCH_NAMES = {"gpt2": "a GPT-2", "opt": "an OPT"}


def _a(model_type: str | None) -> str:
    return _ARCH_NAMES.get(model_type, f"a {model_type!r}")


class PatternRecorder:
    """Record the post-softmax attention patterns of a plain HF GPT-2/OPT model on its own forward.

    The one capture implementation: :class:`AttentionPatcher` records its reference with it, and
    :meth:`factlens.bios.patching.references.Reference.from_model` its HF sources. Each recorded layer gets an edit
    that stores the pattern (detached) and returns it unchanged; the edits are built once, so a compiled forward
    sees the same functions on every call (no recompiles), and they are installed only while :meth:`run` runs,
    so one model can serve several recorders.

    Example:
        >>> import torch, factlens
        >>> from factlens.bios.patching.training import PatternRecorder
        >>> model = factlens.build_hf("gpt2", n_layer=2, n_head=2, n_embd=32, vocab_size=100)
        >>> patterns = PatternRecorder(model).run(torch.randint(0, 100, (1, 5)))
        >>> sorted(patterns), tuple(patterns[0].shape)
        ([0, 1], (1, 2, 5, 5))

    Args:
        model: the HF model (it is pointed at factlens's attention function, which computes the patterns).
        layers: the 0-based layers to record (default all).
    """

    def __init__(self, model: PreTrainedModel, layers: Sequence[int] | None = None) -> None:
        use_factlens_attention(unwrap(model))
        self.model = model
        self.layers = list(range(len(attention_modules(model)))) if layers is None else list(layers)
        self.patterns: dict[int, torch.Tensor | None] = dict.fromkeys(self.layers)
        self._edits = {layer: LayerEdit(pattern_fn=self._store(layer)) for layer in self.layers}

    def _store(self, layer: int):
        def fn(pattern: torch.Tensor) -> torch.Tensor:
            # only a tensor is stored here: counting happens outside (a compiled forward would otherwise
            # specialise on a counter's value and recompile every call)
            self.patterns[layer] = pattern.detach()
            return pattern
        return fn

    @torch.no_grad()
    def run(self, input_ids: Int[torch.Tensor, "batch pos"], forward=None, *,
            strict: bool = True) -> dict[int, Float[torch.Tensor, "batch head q k"]]:
        """Run ``forward`` (default the model) on ``input_ids``; returns ``{layer: pattern}``.

        Patterns of an earlier call are never returned (the slots are reset first). With ``strict`` a layer
        that recorded nothing raises :class:`~factlens.errors.HookDidNotFireError`.
        """
        for layer in self.layers:
            self.patterns[layer] = None
        mods = attention_modules(self.model)
        try:
            for layer in self.layers:
                set_layer_edit(mods[layer], self._edits[layer])
            run = self.model if forward is None else forward  # (a compiled module has no truth value)
            run(input_ids.to(next(unwrap(self.model).parameters()).device))
        finally:
            for layer in self.layers:
                set_layer_edit(mods[layer], None)
        missing = [layer for layer in self.layers if self.patterns[layer] is None]
        if strict and missing:
            raise HookDidNotFireError(
                f"layers {missing} recorded no attention pattern: the model's attention does not route through "
                "factlens (build it with factlens.build_hf or call factlens.attention.use_factlens_attention).")
        return {layer: p for layer, p in self.patterns.items() if p is not None}


def _refuse_shared(model: PreTrainedModel, reference: PreTrainedModel) -> None:
    """The reference must be another model: patching freezes it, and it must not be the trainee."""
    fix = ("Pass a separate frozen copy as the reference: copy.deepcopy(model) for the model as it is now, or "
           "load_checkpoint(path).build_model() for a checkpoint.")
    if unwrap(model) is unwrap(reference):
        raise ConfigError("the reference is the model being trained: the patcher would freeze it "
                          f"(requires_grad_(False)) and feed it its own patterns. {fix}")
    own = {p.untyped_storage().data_ptr(): name for name, p in unwrap(model).named_parameters()}
    for p in unwrap(reference).parameters():
        name = own.get(p.untyped_storage().data_ptr())
        if name is not None and p.untyped_storage().data_ptr() != 0:
            raise ConfigError(f"the reference shares the parameter {name} with the model being trained: freezing "
                              f"the reference would freeze it in the trainee too. {fix}")


def _check_same_architecture(model: PreTrainedModel, reference: PreTrainedModel) -> None:
    ref, own = architecture(_config(reference)), architecture(_config(model))
    ref_type, own_type = ref.get("model_type"), own.get("model_type")
    if ref_type != own_type:
        raise ArchitectureMismatchError(
            f"the reference is {_a(ref_type)} model and the model being trained {_a(own_type)} model; patterns are "
            "patched between models of one architecture. "
            f"Train the patched run with arch={ref_type!r} (--arch {ref_type}), or patch from a reference run "
            f"trained with arch={own_type!r}.")
    check_same_architecture(ref, own)


class AttentionPatcher:
    """Replace a trained model's attention patterns with a frozen reference's, layer by layer.

    Args:
        model: the HF model being trained (GPT-2 or OPT, factlens attention).
        reference: another, frozen HF model of the same architecture (e.g. a reference checkpoint); the model
            itself, or a model sharing its parameters, is refused.
        layers: 0-based layers to patch (default all). heads: 0-based heads to patch (default all).

    Attributes:
        frozen: the parameters :meth:`install` froze (``q_proj``/``k_proj`` of fully patched OPT layers).
    """

    def __init__(self, model: PreTrainedModel, reference: PreTrainedModel, *, layers: Sequence[int] | None = None,
                 heads: Sequence[int] | None = None) -> None:
        _refuse_shared(model, reference)
        _check_same_architecture(model, reference)
        self.model, self.reference = model, reference
        n_layers = len(attention_modules(model))
        n_heads = _config(model).num_attention_heads
        self.layers = layer_indices(n_layers, layers)
        heads = head_indices(n_heads, heads)
        self.heads = None if heads is None or len(heads) == n_heads else heads
        self.captured = dict.fromkeys(self.layers, 0)
        self.consumed = dict.fromkeys(self.layers, 0)
        self.installed = False
        self.frozen: list[torch.nn.Parameter] = []
        reference.eval().requires_grad_(False)
        self._recorder = PatternRecorder(reference, self.layers)
        # replaced by torch.compile(reference) for compiled training; a compiled reference must belong to one
        # patcher (another patcher's capture edits would invalidate its graph and force recompiles)
        self.reference_forward = reference

    # ------------------------------------------------------------------------------------ edits
    def _take(self, layer: int) -> torch.Tensor:
        # No Python state is mutated here when compiling: torch.compile traces this into the model's graph.
        pattern = self._recorder.patterns[layer]
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
        """Install the replace edits on the model (the reference is hooked only while it runs).

        A fully patched layer never computes ``QK^T``; where W_Q and W_K are parameters of their own (OPT's
        ``q_proj``/``k_proj``) they are frozen until :meth:`remove`, so that a DDP wrapper built after this
        call does not wait for their gradients. Installing twice is a no-op.
        """
        if self.installed:
            return self
        device = next(unwrap(self.model).parameters()).device
        mods = attention_modules(self.model)
        for layer in self.layers:
            set_layer_edit(mods[layer], self._edit(layer, device))
            if self.heads is None:
                for proj in ("q_proj", "k_proj"):
                    sub = getattr(mods[layer], proj, None)
                    for p in sub.parameters() if isinstance(sub, torch.nn.Module) else ():
                        if p.requires_grad:
                            p.requires_grad_(False)
                            self.frozen.append(p)
        self.installed = True
        return self

    def remove(self) -> None:
        """Remove every edit and unfreeze what :meth:`install` froze: the model is back on the SDPA path."""
        for mod in attention_modules(self.model):
            set_layer_edit(mod, None)
        for p in self.frozen:
            p.requires_grad_(True)
        self.frozen = []
        for layer in self.layers:
            self._recorder.patterns[layer] = None
        self.installed = False

    def __enter__(self) -> AttentionPatcher:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---------------------------------------------------------------------------------- running
    @torch.no_grad()
    def run_reference(self, input_ids: Int[torch.Tensor, "batch pos"]) -> None:
        """Run the frozen reference on the batch, capturing its patterns for the next model forward."""
        patterns = self._recorder.run(input_ids, self.reference_forward, strict=False)
        for layer in patterns:
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
        delta = float((at_least_fp32(patched) - at_least_fp32(plain)).abs().max())
        if delta <= atol:
            raise InterventionNoEffectError(
                "attention patching left the logits unchanged: the reference's patterns equal the model's own "
                "(same weights?). Patch from a different checkpoint, or skip the check."
            )
        return delta
