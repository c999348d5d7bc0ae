"""factlens's registered attention function: SDPA when nothing is edited, explicit softmax when it is.

HF GPT-2 and OPT call their attention math through transformers' ``AttentionInterface`` registry. factlens
registers one function there, ``"factlens"``, and points models it loads or builds at it. It serves three
jobs:

1. **Fast training.** With no edit installed on a layer it calls transformers' own SDPA path (flash /
   memory-efficient kernels on a GPU), so an unpatched plain-HF model trains exactly as fast as stock SDPA.
2. **Pattern and score edits on plain HF models** (the biography trainer's attention patching): a layer
   whose module carries a :class:`LayerEdit` computes ``QK^T * scale → mask → scores_fn → softmax →
   pattern_fn → dropout → · V`` explicitly, so the edited pattern really re-weights the values.
3. **TransformerLens's own hooks on OPT.** TL 4.3 wraps OPT attention in a plain ``AttentionBridge`` that
   lets HF compute and then fires ``hook_pattern`` *post hoc* on weights already used: edits are silently
   discarded, and ``hook_attn_scores`` is post-softmax. The bridge has a seam: if the wrapped module sets
   ``accepts_pattern_fn = True`` it passes ``pattern_fn=self.hook_pattern`` into the module's kwargs, which
   HF forwards to the attention function. :func:`install_bridge_hooks` sets that flag and wires
   ``hook_attn_scores`` in as ``scores_fn``, so on OPT both TL hooks take effect exactly as on GPT-2, and
   ``hook_attn_scores`` is genuinely pre-softmax. (GPT-2's ``JointQKVAttentionBridge`` already recomputes
   attention in Python, so it needs none of this.) A layer whose two hook points have no hook attached
   takes the SDPA path; attaching one (``run_with_hooks``, ``run_with_cache`` over ``hook_pattern``, a
   factlens intervention) switches only that layer to the explicit path. :data:`PATH_COUNTS` counts the
   paths taken.

The mask function registered with the attention function is transformers' ``sdpa_mask``: a boolean mask
(``True`` = may attend) or ``None`` for a plain causal batch, which lets SDPA take its ``is_causal`` fast
path. The explicit path rebuilds the causal mask itself when it receives ``None``.

Example:
    >>> import torch, factlens
    >>> from factlens.attention import LayerEdit, set_layer_edit
    >>> hf = factlens.models.build_hf("gpt2", n_layer=1, n_head=2, n_embd=16, vocab_size=50)
    >>> attn = hf.transformer.h[0].attn
    >>> set_layer_edit(attn, LayerEdit(pattern_fn=lambda p: torch.ones_like(p) / p.shape[-1]))
    >>> _ = hf(torch.tensor([[1, 2, 3]]))
    >>> set_layer_edit(attn, None)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from factlens.inputs import compute_dtype

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

ATTN_IMPL = "factlens"
_EDIT_ATTR = "_factlens_edit"
#: Calls of :func:`factlens_attention` per path (``"sdpa"``, ``"explicit"``, ``"replace"``), process-wide: tests
#: and benchmarks read it to show which path a forward pass took (not counted inside ``torch.compile``).
PATH_COUNTS: Counter[str] = Counter()

TensorFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LayerEdit:
    """What the explicit attention path applies on one layer.

    Attributes:
        scores_fn: applied to the masked pre-softmax scores ``[batch, head, query, key]``.
        pattern_fn: applied to the post-softmax pattern ``[batch, head, query, key]``.
        replace: returns a complete pattern that replaces this layer's own in every head. The layer then
            skips ``QK^T`` and the softmax altogether (its W_Q/W_K receive no gradient either way), so a
            fully patched layer costs one ``pattern @ V``.
    """

    scores_fn: TensorFn | None = None
    pattern_fn: TensorFn | None = None
    replace: Callable[[], torch.Tensor] | None = None


def set_layer_edit(module: torch.nn.Module, edit: LayerEdit | None) -> None:
    """Install (or with ``None`` remove) a :class:`LayerEdit` on an HF attention module."""
    if edit is None:
        if hasattr(module, _EDIT_ATTR):
            delattr(module, _EDIT_ATTR)
    else:
        setattr(module, _EDIT_ATTR, edit)


def get_layer_edit(module: torch.nn.Module) -> LayerEdit | None:
    """The :class:`LayerEdit` installed on ``module``, if any."""
    return getattr(module, _EDIT_ATTR, None)


def causal_bool_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """``[q, k]`` boolean mask, ``True`` where query ``i`` may attend key ``j`` (keys end at the query)."""
    offset = k_len - q_len
    q_idx = torch.arange(q_len, device=device)[:, None] + offset
    return torch.arange(k_len, device=device)[None, :] <= q_idx


def explicit_attention(
    module: torch.nn.Module,
    query: Float[torch.Tensor, "batch head q d_head"],
    key: Float[torch.Tensor, "batch head k d_head"],
    value: Float[torch.Tensor, "batch head k d_head"],
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    scores_fn: TensorFn | None,
    pattern_fn: TensorFn | None,
) -> tuple[Float[torch.Tensor, "batch q head d_head"], Float[torch.Tensor, "batch head q k"]]:
    """Attention with explicit scores and pattern, applying the edits. Returns (output, pattern)."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # [b, h, q, k]
    min_value = torch.finfo(scores.dtype).min
    if attention_mask is None:
        allowed = causal_bool_mask(query.shape[-2], key.shape[-2], query.device)
        scores = scores.masked_fill(~allowed, min_value)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, min_value)
    else:  # additive float mask (eager_mask convention)
        scores = scores + attention_mask
    if scores_fn is not None:
        scores = scores_fn(scores)
    # softmax in float32 for fp16/bf16, in float64 for an fp64 model (never rounded down)
    pattern = torch.softmax(scores, dim=-1, dtype=compute_dtype(scores.dtype)).to(value.dtype)  # [b, h, q, k]
    if pattern_fn is not None:
        pattern = pattern_fn(pattern)
    dropped = torch.nn.functional.dropout(pattern, p=dropout, training=module.training)
    out = torch.matmul(dropped, value).transpose(1, 2).contiguous()  # [b, q, h, d_head]
    return out, pattern


def factlens_attention(
    module: torch.nn.Module,
    query: Float[torch.Tensor, "batch head q d_head"],
    key: Float[torch.Tensor, "batch head k d_head"],
    value: Float[torch.Tensor, "batch head k d_head"],
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    pattern_fn: TensorFn | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The function registered as ``"factlens"`` in transformers' attention registry.

    ``pattern_fn`` arrives from TransformerLens's ``AttentionBridge`` (its ``hook_pattern``) on bridged OPT;
    a :class:`LayerEdit` on the module comes from factlens's own plain-HF edits. With neither (or with TL
    hook points that have no hook attached), this is transformers' SDPA attention. Returns ``None`` as the weights so the bridge never re-fires
    ``hook_pattern``/``hook_attn_scores`` post hoc.
    """
    edit = getattr(module, _EDIT_ATTR, None)
    pattern_fn = _live(pattern_fn)
    scores_fn = _live(getattr(module, "_factlens_scores_hook", None))
    if edit is not None and edit.replace is not None and pattern_fn is None and scores_fn is None:
        _count("replace")
        pattern = edit.replace().to(value.dtype)  # [b, h, q, k]
        pattern = torch.nn.functional.dropout(pattern, p=dropout, training=module.training)
        return torch.matmul(pattern, value).transpose(1, 2).contiguous(), None
    if edit is not None:
        scores_fn = _compose(scores_fn, edit.scores_fn)
        pattern_fn = _compose(pattern_fn, edit.pattern_fn)
    if pattern_fn is None and scores_fn is None:
        _count("sdpa")
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    _count("explicit")
    out, _ = explicit_attention(module, query, key, value, attention_mask, scaling, dropout, scores_fn, pattern_fn)
    return out, None


def _has_hooks(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` would run any forward/backward hook (its own or a global one)."""
    from torch.nn.modules import module as nn_module

    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or nn_module._global_forward_hooks
                or nn_module._global_forward_pre_hooks or nn_module._global_backward_hooks
                or nn_module._global_backward_pre_hooks)


def _live(fn: TensorFn | None) -> TensorFn | None:
    """``fn``, or None when it is a hook point (an identity module) with no hook attached.

    TL's ``AttentionBridge`` passes its ``hook_pattern`` HookPoint on every call, and factlens wires
    ``hook_attn_scores`` in the same way; with nothing attached both are the identity, so the layer can take
    the SDPA path. A hook (``run_with_hooks``, ``run_with_cache``, ``model.hooks``, a backward hook) makes
    the layer compute its pattern explicitly so the hook sees, and may edit, the real tensor.
    """
    if isinstance(fn, torch.nn.Module) and not _has_hooks(fn):
        return None
    return fn


def _count(path: str) -> None:
    if not torch.compiler.is_compiling():  # a Python counter inside a compiled graph would force recompiles
        PATH_COUNTS[path] += 1


def _compose(first: TensorFn | None, second: TensorFn | None) -> TensorFn | None:
    if first is None:
        return second
    if second is None:
        return first
    return lambda t: second(first(t))


def register() -> str:
    """Register the ``"factlens"`` attention + mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPL, factlens_attention)
    AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)
    return ATTN_IMPL


def use_factlens_attention(hf_model: torch.nn.Module) -> None:
    """Point an HF model (and every sub-config) at the ``"factlens"`` attention function."""
    register()
    config = hf_model.config
    config._attn_implementation = ATTN_IMPL
    for sub in ("text_config", "decoder"):
        if hasattr(config, sub) and hasattr(getattr(config, sub), "_attn_implementation"):
            getattr(config, sub)._attn_implementation = ATTN_IMPL


def install_bridge_hooks(bridge: TransformerBridge) -> int:
    """Make TL's ``hook_pattern``/``hook_attn_scores`` take effect on a bridge whose attention calls HF.

    For every block whose attention bridge delegates to an HF module (OPT's plain ``AttentionBridge``),
    route HF through ``"factlens"``, set ``accepts_pattern_fn`` so the bridge passes its ``hook_pattern``
    into the computation, and wire its ``hook_attn_scores`` in before the softmax. Blocks whose bridge
    recomputes attention itself (GPT-2's ``JointQKVAttentionBridge``) are left alone. Idempotent.

    Returns:
        The number of attention layers rewired.
    """
    from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import (
        JointQKVAttentionBridge,
    )

    n = 0
    for block in bridge.blocks:
        attn = block.attn
        if isinstance(attn, JointQKVAttentionBridge):
            continue
        hf_attn = attn.original_component
        hf_attn.accepts_pattern_fn = True
        hf_attn._factlens_scores_hook = attn.hook_attn_scores
        n += 1
    if n:
        use_factlens_attention(bridge.original_model)
    return n
