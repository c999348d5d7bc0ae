"""Edits of the forward pass: attention-pattern patches, score edits and vector additions.

Each constructor returns an :class:`~factlens.hooks.Intervention` bound to the model it was built for (its
layers, heads and sizes are resolved and checked there); run it with :func:`~factlens.intervening.intervene`,
which proves that it took effect.

- :func:`patch_pattern` replaces post-softmax attention patterns (``hook_pattern``), e.g. with a reference
  model's (Zucchet et al.'s attention patching); every patched row is checked to be a causal attention pattern.
- :func:`edit_scores` edits pre-softmax, post-mask attention scores (``hook_attn_scores``) with any function.
- :func:`attend_to_self` is Lv et al.'s mitigation (a): chosen heads attend only to the query's own position.
- :func:`add_vector` adds a vector to a residual-width activation (mitigation (b) subtracts the final MLP's
  intercept).

Layers and heads are read as in :mod:`factlens.indices` (negative counts from the end); positions may be an
int, a list, or a ``[batch]`` tensor of one position per prompt.

Example:
    >>> import torch, factlens
    >>> from factlens.edits import add_vector, attend_to_self
    >>> model = factlens.tiny("gpt2")
    >>> edits = [attend_to_self(model, layers=-1, positions=-1),
    ...          add_vector(model, torch.ones(model.cfg.d_model), layer=0, component="mlp_out")]
    >>> with factlens.intervene(model, *edits) as run:
    ...     logits = model(model.to_tokens("The capital of France is"))
    >>> sorted(run.records)
    ['blocks.0.hook_mlp_out', 'blocks.1.attn.hook_attn_scores']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int

from factlens.attention import causal_bool_mask
from factlens.errors import ConfigError, ShapeError
from factlens.hooks import Intervention, act_name
from factlens.indices import check_index, head_indices, layer_indices, position_indices
from factlens.inputs import at_least_fp32

if TYPE_CHECKING:
    from transformer_lens import ActivationCache
    from transformer_lens.model_bridge import TransformerBridge

Positions = int | Sequence[int] | Int[torch.Tensor, " batch"] | None


# ----------------------------------------------------------------------------------------------- indices
def resolve_layers(model: TransformerBridge, layers: int | Sequence[int] | None) -> list[int]:
    """Layer indices (negative counts from the end); ``None`` = all (see :mod:`factlens.indices`)."""
    return layer_indices(model.cfg.n_layers, layers)


def resolve_heads(model: TransformerBridge, heads: int | Sequence[int] | None) -> list[int] | None:
    """Head indices; ``None`` = all heads (returned as None); see :mod:`factlens.indices`."""
    return head_indices(model.cfg.n_heads, heads)


def _rows_and_positions(positions: Positions, batch: int, seq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors (rows, pos) selecting the edited positions of a [batch, seq, ...] tensor."""
    return position_indices(positions, batch, seq, device)


def selection_mask(shape: torch.Size, heads: list[int] | None, positions: Positions,
                   device) -> torch.Tensor:
    """Boolean ``[batch, head, query]`` mask of the (prompt, head, query position) cells an edit touches."""
    b, h, q = shape[0], shape[1], shape[2]
    rows, pos = _rows_and_positions(positions, b, q, device)
    sel = torch.zeros(b, q, dtype=torch.bool, device=device)
    sel[rows, pos] = True
    hmask = torch.zeros(h, dtype=torch.bool, device=device)
    hmask[slice(None) if heads is None else heads] = True
    return sel[:, None, :] & hmask[None, :, None]


# ------------------------------------------------------------------------------------------------- edits
PatternSource = (
    Float[torch.Tensor, "batch head q k"]
    | Mapping[int, torch.Tensor]
    | Mapping[str, torch.Tensor]
    | Callable[[torch.Tensor, int], torch.Tensor]
)


def _pattern_tolerance(dtype: torch.dtype) -> float:
    """How far a valid pattern's rows may be from summing to 1 (and its entries below 0) in ``dtype``."""
    return max(1e-3, 2 * torch.finfo(dtype).eps)  # fp32 1e-3; fp16 2e-3; bf16 1.6e-2


def _check_pattern(src: torch.Tensor, target: torch.Tensor, where: str, *, causal: bool = True,
                   sel: torch.Tensor | None = None) -> None:
    """Refuse a pattern that cannot be an attention pattern of this model on the rows ``sel`` it replaces.

    Checks the shape, device, dtype, finiteness, non-negativity, row sums (post-softmax) and, unless
    ``causal=False``, that no query attends to a key after it (keys end at the query, as in the KV cache).
    """
    if src.shape != target.shape:
        raise ShapeError(f"{where}: pattern of shape {tuple(src.shape)} where the model's is {tuple(target.shape)} "
                         "[batch, head, query, key]; run the reference on the same tokens.")
    if src.device != target.device:
        raise ShapeError(f"{where}: pattern on {src.device} but the model runs on {target.device}; move it with .to().")
    if not src.is_floating_point():
        raise ShapeError(f"{where}: pattern has dtype {src.dtype}; pass a floating-point attention pattern.")
    with torch.no_grad():
        p = at_least_fp32(src.detach())  # [b, h, q, k]
        rows = torch.ones(p.shape[:-1], dtype=torch.bool, device=p.device) if sel is None else sel  # [b, h, q]
        used = p[rows]  # [n_rows, k]
        if not torch.isfinite(used).all():
            raise ShapeError(f"{where}: pattern contains NaN or inf; check the reference model's forward pass.")
        tol = _pattern_tolerance(src.dtype)
        if used.numel() and float(used.min()) < -tol:
            raise ShapeError(f"{where}: pattern has negative weights (min {float(used.min()):.3g}); attention "
                             "weights are >= 0. Pass a post-softmax pattern (hook_pattern), e.g. "
                             "scores.softmax(-1), not a difference of patterns.")
        row_sums = used.sum(-1)
        if row_sums.numel() and float((row_sums - 1).abs().max()) > tol:
            raise ShapeError(f"{where}: pattern rows must sum to 1 (post-softmax); found sums in "
                             f"[{float(row_sums.min()):.3f}, {float(row_sums.max()):.3f}]. Pass hook_pattern, not "
                             "hook_attn_scores.")
        if causal:
            q, k = p.shape[-2], p.shape[-1]
            future = ~causal_bool_mask(q, k, p.device)  # [q, k]
            leak = (p.abs() > tol) & future & rows[..., None]  # [b, h, q, k]
            if bool(leak.any()):
                b, h, i, j = (int(x) for x in leak.nonzero()[0])
                raise ShapeError(f"{where}: pattern puts weight {float(p[b, h, i, j]):.3g} on a future key "
                                 f"(prompt {b}, head {h}, query {i} -> key {j}); in a causal model a query attends "
                                 "only to keys at or before it. Build the pattern with a causal mask, or pass "
                                 "causal=False to patch_pattern if the leak is intended.")


def patch_pattern(model: TransformerBridge, source: PatternSource | ActivationCache, *,
                  layers: int | Sequence[int] | None = None,
                  heads: int | Sequence[int] | None = None, positions: Positions = None,
                  detach: bool = True, causal: bool = True) -> Intervention:
    """Replace the post-softmax attention pattern (``hook_pattern``) of chosen layers/heads/query positions.

    Args:
        model: a factlens-prepared bridge (GPT-2 or OPT).
        source: a ``[batch, head, q, k]`` tensor used for every chosen layer; a mapping ``{layer: tensor}``;
            an ``ActivationCache`` or mapping keyed by TL names (``blocks.L.attn.hook_pattern``, e.g. a
            reference model's cache); or a function ``(pattern, layer) -> pattern``.
        layers: layers to patch (default all). heads: heads (default all; ``[]`` = identity).
        positions: query positions (default all; an int, a list, or a ``[batch]`` tensor of one position
            per prompt).
        detach: patch in ``source.detach()`` so no gradient flows into the source (stop-gradient).
        causal: refuse a pattern with weight on future keys (the default). Every patched row must also be
            non-negative and sum to 1 (within ``max(1e-3, 2·eps)`` of its dtype: 1.6e-2 in bf16).

    Example:
        >>> import factlens
        >>> from factlens import patch_pattern
        >>> model = factlens.tiny("gpt2")
        >>> tokens = model.to_tokens("The capital of France is")
        >>> _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
        >>> edit = patch_pattern(model, cache)       # every layer, every head
        >>> with factlens.intervene(model, edit, on_no_effect="ignore"):   # its own patterns: no effect
        ...     _ = model(tokens)
    """
    layer_ids = resolve_layers(model, layers)
    head_ids = resolve_heads(model, heads)
    iv = Intervention(f"patch_pattern(layers={layer_ids}, heads={head_ids or 'all'})").bind(model)
    if head_ids == [] or not layer_ids:
        iv.identity = True
        return iv
    for layer in layer_ids:
        name = act_name("pattern", layer)

        def fn(pattern: torch.Tensor, hook, layer=layer, name=name) -> torch.Tensor:
            if callable(source) and not isinstance(source, (torch.Tensor, Mapping)):
                new = source(pattern, layer)
            elif isinstance(source, torch.Tensor):
                new = source
            elif layer in source:
                new = source[layer]
            elif name in source:
                new = source[name]
            else:
                raise ShapeError(f"patch_pattern: the source has no pattern for layer {layer} ({name!r}); pass a "
                                 "pattern for every patched layer (e.g. a cache from run_with_cache with names_filter="
                                 "lambda n: n.endswith('hook_pattern')) or restrict layers= to those it has.")
            if not isinstance(new, torch.Tensor):
                raise ShapeError(f"{name}: the source gave {type(new).__name__}, not a [batch, head, q, k] tensor.")
            sel = None if head_ids is None and positions is None else \
                selection_mask(pattern.shape, head_ids, positions, pattern.device)  # [b, h, q]
            _check_pattern(new, pattern, name, causal=causal, sel=sel)
            new = new.detach() if detach else new
            new = new.to(pattern.dtype)
            if sel is None:
                return new
            return torch.where(sel[..., None], new, pattern)

        iv.add(name, fn, copy_input=False)
    return iv


def _check_scores(new: torch.Tensor, old_shape: torch.Size, was_closed: torch.Tensor, was_nan: torch.Tensor,
                  where: str) -> None:
    """Refuse an edited score tensor whose softmax would be NaN or meaningless: NaN, or a row with no key left."""
    if new.shape != old_shape:
        raise ShapeError(f"{where}: the score edit returned shape {tuple(new.shape)} for scores of shape "
                         f"{tuple(old_shape)} [batch, head, query, key]; return a tensor of the same shape.")
    with torch.no_grad():
        if bool((torch.isnan(new) & ~was_nan).any()):
            raise ShapeError(f"{where}: the score edit wrote NaN into the attention scores; mask keys with "
                             "torch.finfo(scores.dtype).min (or -inf), never NaN.")
        floor = torch.finfo(new.dtype).min
        closed = ~(new > floor).any(-1) & ~was_closed  # [b, h, q]: rows the edit closed completely
        if bool(closed.any()):
            b, h, q = (int(x) for x in closed.nonzero()[0])
            raise ShapeError(f"{where}: the score edit masks every key of {int(closed.sum())} query row(s) (first: "
                             f"prompt {b}, head {h}, query {q}), so their softmax is NaN or uniform over masked keys. "
                             "Leave at least one key open per row (attend_to_self keeps the query's own key).")


def edit_scores(model: TransformerBridge, fn: Callable[[torch.Tensor, int], torch.Tensor | None], *,
                layers: int | Sequence[int] | None = None, description: str = "edit_scores") -> Intervention:
    """Edit the pre-softmax, post-mask attention scores (``hook_attn_scores``) with ``fn(scores, layer)``.

    On GPT-2 and on factlens-prepared OPT bridges the hook is genuinely pre-softmax. ``fn`` may edit the
    scores in place (returning them or ``None``). An edit that writes NaN, or that masks every key of a
    query row (its softmax would be NaN), raises :class:`~factlens.errors.ShapeError` in the forward pass.

    Example:
        >>> import factlens
        >>> import torch
        >>> from factlens import edit_scores
        >>> model = factlens.tiny("gpt2")
        >>> def no_bos(scores, layer):           # [b, h, q, k]: no query attends to the BOS token
        ...     scores[:, :, 1:, 0] = torch.finfo(scores.dtype).min
        >>> with factlens.intervene(model, edit_scores(model, no_bos, layers=0)) as run:
        ...     _ = model(model.to_tokens("The capital of France is"))
        >>> run.records["blocks.0.attn.hook_attn_scores"].n_masked
        20
    """
    return _edit_scores(model, fn, layers=layers, description=description, copy_input=True)


def _edit_scores(model: TransformerBridge, fn, *, layers, description: str, copy_input: bool) -> Intervention:
    iv = Intervention(description).bind(model)
    for layer in resolve_layers(model, layers):
        name = act_name("attn_scores", layer)

        def hook_fn(scores: torch.Tensor, hook, layer=layer, name=name) -> torch.Tensor:
            shape = scores.shape
            with torch.no_grad():
                was_closed = ~(scores > torch.finfo(scores.dtype).min).any(-1)  # [b, h, q]
                was_nan = torch.isnan(scores)
            out = fn(scores, layer)
            out = scores if out is None else out
            _check_scores(out, shape, was_closed, was_nan, name)
            return out

        iv.add(name, hook_fn, copy_input=copy_input)
    return iv


def attend_to_self(model: TransformerBridge, *, layers: int | Sequence[int] | None = -1, positions: Positions = -1,
                   heads: int | Sequence[int] | None = None) -> Intervention:
    """Lv et al.'s mitigation (a): at the chosen query positions, chosen heads attend only to themselves.

    Args:
        layers: layers to edit (default the last).
        positions: query positions (default -1, the last position; pass a ``[batch]`` tensor of each
            prompt's last real index for right-padded batches).
        heads: heads to restrict (default all; ``[]`` = identity).

    Example:
        >>> import torch, factlens
        >>> from factlens import attend_to_self
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> from factlens.recall.datasets import dataset_for
        >>> dataset = dataset_for(model)
        >>> edit = attend_to_self(model, layers=-1, positions=dataset.end)
    """
    head_ids = resolve_heads(model, heads)
    layer_ids = resolve_layers(model, layers)
    if head_ids == [] or not layer_ids:
        return Intervention("attend_to_self (no heads)", identity=True).bind(model)

    def fn(scores: torch.Tensor, layer: int) -> torch.Tensor:  # [b, h, q, k]
        _, _, q, k = scores.shape
        sel = selection_mask(scores.shape, head_ids, positions, scores.device)  # [b, h, q]
        keys = torch.arange(k, device=scores.device)
        not_self = keys[None, :] != (torch.arange(q, device=scores.device) + (k - q))[:, None]  # [q, k]
        floor = torch.finfo(scores.dtype).min
        open_keys = scores > floor  # keys the causal mask has not already closed (-inf or dtype-min)
        return scores.masked_fill(sel[..., None] & not_self & open_keys, floor)

    return _edit_scores(model, fn, layers=layer_ids, copy_input=False,
                        description=f"attend_to_self(layers={layer_ids}, heads={head_ids or 'all'})")


def add_vector(model: TransformerBridge, vector: Float[torch.Tensor, "... d_model"], *, hook_name: str | None = None,
               layer: int = -1, component: str = "mlp_out", positions: Positions = None,
               coeff: float = 1.0) -> Intervention:
    """Add ``coeff * vector`` to a residual-stream or component output at chosen positions.

    Args:
        vector: ``[d_model]`` (same for every prompt) or ``[batch, d_model]``.
        hook_name: a TL hook name; default ``get_act_name(component, layer)`` (``blocks.L.hook_mlp_out``).
        positions: positions to edit (default all; a ``[batch]`` tensor = one per prompt).
        coeff: scale; ``-1`` subtracts (Lv et al.'s mitigation (b) subtracts the final MLP's intercept).

    Example:
        >>> import torch, factlens
        >>> from factlens import add_vector
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> from factlens.recall.datasets import dataset_for
        >>> dataset = dataset_for(model)
        >>> intercept = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
        >>> edit = add_vector(model, -intercept, layer=-1, component="mlp_out", positions=dataset.end)
    """
    if hook_name is None:
        hook_name = act_name(component, check_index(layer, model.cfg.n_layers, "layer", "layers"))
    if hook_name.endswith(_NOT_RESIDUAL):
        raise ShapeError(f"add_vector adds a [d_model] vector to a [batch, pos, d_model] activation, but {hook_name!r} "
                         "is not one (hook_z/q/k/v are [batch, pos, head, d_head], patterns and scores [batch, head, "
                         "q, k], mlp hook_pre/hook_post [batch, pos, d_mlp]). Add it to hook_resid_pre/mid/post, "
                         "hook_attn_out or hook_mlp_out, or edit that hook with factlens.hook(name, fn).")
    if not isinstance(vector, torch.Tensor) or not vector.is_floating_point() or vector.ndim not in (1, 2):
        raise ShapeError(f"add_vector: vector must be a floating-point [d_model] or [batch, d_model] tensor, got "
                         f"{type(vector).__name__} {tuple(getattr(vector, 'shape', ()))}; e.g. "
                         "torch.tensor(values, dtype=torch.float32)")
    if not torch.isfinite(vector).all():
        raise ShapeError("add_vector: the vector contains NaN or inf.")
    if vector.shape[-1] != model.cfg.d_model:
        raise ShapeError(f"add_vector: vector has size {vector.shape[-1]}, the model's d_model is {model.cfg.d_model}.")
    if not isinstance(coeff, (int, float)) or isinstance(coeff, bool) or not math.isfinite(coeff):
        raise ConfigError(f"add_vector: coeff={coeff!r}; pass a finite number (-1 subtracts the vector).")
    iv = Intervention(f"add_vector({hook_name}, coeff={coeff})").bind(model)
    iv.key = ("add_vector", hook_name, _digest(coeff * vector.detach().float().cpu()), _positions_key(positions))
    if coeff == 0 or not bool(vector.any()):
        iv.identity = True
        return iv

    def fn(t: torch.Tensor, hook) -> torch.Tensor:  # [b, p, d]
        if t.ndim != 3 or t.shape[-1] != vector.shape[-1]:
            raise ShapeError(f"add_vector: {hook_name!r} carries shape {tuple(t.shape)}, not [batch, pos, d_model="
                             f"{vector.shape[-1]}]; add vectors to residual-width hooks (hook_resid_*, hook_attn_out, "
                             "hook_mlp_out) or edit this one with factlens.hook(name, fn).")
        v = (coeff * vector).to(device=t.device, dtype=t.dtype)
        rows, pos = _rows_and_positions(positions, t.shape[0], t.shape[1], t.device)
        out = t.clone()
        if v.ndim == 1:
            out[rows, pos] = out[rows, pos] + v
        else:
            if v.shape[0] != t.shape[0]:
                raise ShapeError(f"add_vector: per-prompt vector has {v.shape[0]} rows but the batch has {t.shape[0]} "
                                 "prompts; pass one row per prompt ([batch, d_model]) or one [d_model] vector for all.")
            out[rows, pos] = out[rows, pos] + v[rows]
        return out

    iv.add(hook_name, fn, copy_input=False)
    return iv


_NOT_RESIDUAL = ("hook_z", "hook_q", "hook_k", "hook_v", "hook_pattern", "hook_attn_scores", "mlp.hook_pre",
                 "mlp.hook_post", "hook_result", "hook_scale")


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def _positions_key(positions: Positions) -> object:
    if isinstance(positions, torch.Tensor):
        return _digest(positions.detach().cpu().to(torch.int64))
    return repr(positions)
