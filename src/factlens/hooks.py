"""The intervention layer: attention-pattern patches, score edits and vector additions that prove they ran.

Every factlens edit of a forward pass is an :class:`Intervention`. Interventions are plain TransformerLens
hooks (``fn(tensor, hook)`` on TL hook names such as ``blocks.3.attn.hook_pattern``) wrapped with a
:class:`HookRecord` that counts calls and notes whether the tensor changed. :func:`intervene` installs
them and, when the block ends, raises

- :class:`~factlens.errors.HookDidNotFireError` if a hook never ran (wrong name, ``stop_at_layer``...),
- :class:`~factlens.errors.InterventionNoEffectError` if a hook ran but left its tensor unchanged, or if
  TransformerLens reported that an edit was discarded (the OPT post-hoc pattern trap; factlens-prepared
  bridges never hit it, see :mod:`factlens.attention`).

Interventions that are the identity by construction (an empty head list, a zero vector, ``coeff=0``)
install no hook and skip the checks. For an edit that is the identity by accident (patching a model with
its own patterns), pass ``on_no_effect="ignore"`` or ``"warn"``.

Example:
    >>> import torch, factlens
    >>> model = factlens.tiny("opt")
    >>> tokens = model.to_tokens("The capital of France is")
    >>> with factlens.intervene(model, factlens.attend_to_self(model, layers=-1, positions=-1)) as run:
    ...     logits = model(tokens)
    >>> run.records["blocks.1.attn.hook_attn_scores"].calls
    1
"""

from __future__ import annotations

import contextlib
import difflib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int

from factlens.attention import causal_bool_mask
from factlens.errors import (
    ArchitectureMismatchError,
    ConfigError,
    HookDidNotFireError,
    InterventionNoEffectError,
    ShapeError,
)
from factlens.indices import check_index, head_indices, layer_indices, position_indices
from factlens.inputs import at_least_fp32

if TYPE_CHECKING:
    from transformer_lens import ActivationCache
    from transformer_lens.model_bridge import TransformerBridge

OnNoEffect = Literal["raise", "warn", "ignore"]
ON_NO_EFFECT = ("raise", "warn", "ignore")
CHANGE_RTOL, CHANGE_ATOL = 1e-5, 1e-6  # a hook "changed" its tensor where torch.isclose(new, old) fails
Positions = int | Sequence[int] | Int[torch.Tensor, " batch"] | None
HookFn = Callable[[torch.Tensor, object], torch.Tensor | None]
HookSpec = tuple[str | Callable[[str], bool], HookFn]  # TL's (name or name filter, fn)


def act_name(kind: str, layer: int | None = None) -> str:
    """TransformerLens's hook name for ``kind`` at ``layer`` (``transformer_lens.utilities.get_act_name``,
    imported on first use so that ``import factlens`` does not load TransformerLens)."""
    from transformer_lens.utilities import get_act_name

    return get_act_name(kind, layer)


def check_on_no_effect(on_no_effect: str) -> str:
    """``on_no_effect`` if it is one of ``"raise"``, ``"warn"``, ``"ignore"``; else a ConfigError naming them."""
    if on_no_effect not in ON_NO_EFFECT:
        close = difflib.get_close_matches(str(on_no_effect), ON_NO_EFFECT, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"on_no_effect={on_no_effect!r} is not an option{hint}; pass one of "
                          f"{', '.join(map(repr, ON_NO_EFFECT))}")
    return on_no_effect


@dataclass
class HookRecord:
    """What happened at one hook point during an :func:`intervene` block.

    Attributes:
        name: The TL hook name.
        calls: How often the hook ran.
        changed: Whether any call changed its tensor beyond float noise (``torch.isclose``).
        max_abs_change: The largest change among entries that are finite on both sides and not at the dtype's
            masking value (``torch.finfo(dtype).min``): a real size, never the mask fill.
        n_changed: Entries changed, summed over calls.
        n_masked: Of those, entries set to (or from) ``±inf``, NaN or the masking value: masking edits such as
            :func:`attend_to_self` change scores only this way.
    """

    name: str
    calls: int = 0
    changed: bool = False
    max_abs_change: float = 0.0
    n_changed: int = 0
    n_masked: int = 0
    expect_change: bool = True  # False for hooks that set a value which may already be there (freezing)
    output_changed: bool | None = None  # whether the model's output moved (checked where the tensor may be unused)
    non_float: bool = False  # the hook's tensor is not floating point (a mask, ids, positions)

    def note(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """Record one call that turned ``before`` into ``after``."""
        self.calls += 1
        self.non_float = self.non_float or not after.is_floating_point()
        if after.shape != before.shape:
            self.changed = True
            self.n_changed += after.numel()
            return
        with torch.no_grad():
            a, b = at_least_fp32(after.detach()), at_least_fp32(before.detach())
            # elementwise closeness: float noise (the same pattern from SDPA vs an explicit softmax) is not a
            # change, and masked entries (finfo.min or -inf, equal on both sides) are equal
            diff = ~torch.isclose(a, b, rtol=CHANGE_RTOL, atol=CHANGE_ATOL)
            n = int(diff.sum())
            if not n:
                return
            big = torch.finfo(after.dtype).max / 2 if after.is_floating_point() else float("inf")
            extreme = ~torch.isfinite(a) | ~torch.isfinite(b) | (a.abs() >= big) | (b.abs() >= big)
            real = diff & ~extreme
            self.changed = True
            self.n_changed += n
            self.n_masked += int((diff & extreme).sum())
            if bool(real.any()):
                self.max_abs_change = max(self.max_abs_change, float((a - b)[real].abs().max()))


class HookRecords(dict):
    """Hook name → :class:`HookRecord`, with :meth:`to_dataframe` (and a table in a notebook)."""

    def __repr__(self) -> str:
        from factlens.display import fmt

        rows = [f"{r.name}: {r.calls} call(s), " + (f"changed, max |Δ| {fmt(r.max_abs_change)}" if r.changed
                                                     else "unchanged") for r in self.values()]
        return "HookRecords(" + (rows[0] if len(rows) == 1 else "".join(f"\n    {r}," for r in rows) + "\n") + ")"

    def _repr_html_(self) -> str:
        return self.to_dataframe()._repr_html_()

    def to_dataframe(self):
        """One row per hook: ``hook``, ``calls``, ``changed``, ``n_changed``, ``n_masked``, ``max_abs_change``."""
        import pandas as pd

        cols = ["hook", "calls", "changed", "n_changed", "n_masked", "max_abs_change"]
        return pd.DataFrame([{"hook": r.name, "calls": r.calls, "changed": r.changed, "n_changed": r.n_changed,
                              "n_masked": r.n_masked, "max_abs_change": r.max_abs_change}
                             for r in self.values()], columns=cols)


@dataclass
class Intervention:
    """A set of TL forward hooks plus the records that prove they ran.

    Build them with :func:`patch_pattern`, :func:`edit_scores`, :func:`attend_to_self`,
    :func:`add_vector` or :func:`hook`; run them with :func:`intervene` or :func:`run_with_interventions`.
    """

    description: str
    fwd_hooks: list[tuple[str, Callable]] = field(default_factory=list)
    identity: bool = False  # the identity by construction: no hooks, no checks
    records: dict[str, HookRecord] = field(default_factory=HookRecords)
    built_for: dict | None = None  # model_signature() of the model it was built for (None: any model)
    key: object = None  # what "the same edit" means for stacking checks (None: this object)

    def add(self, name: str, fn: HookFn, *, copy_input: bool = True, expect_change: bool = True) -> None:
        """Add a hook on TL hook ``name``; the call and the change are recorded.

        ``fn(tensor, hook)`` may return a new tensor, or edit ``tensor`` in place and return it or ``None``
        (the TransformerLens idiom). The change is measured against a copy taken before ``fn`` runs;
        ``copy_input=False`` skips the copy for functions known never to edit their input in place.
        ``expect_change=False`` marks a hook that may legitimately leave its tensor as it was (one that freezes
        an activation at a value it may already have): it must still fire, but is not named when it changes
        nothing.
        """
        key, k = name, 1
        while key in self.records:  # a second hook on the same point (TL allows it): its own record
            k += 1
            key = f"{name} #{k}"
        record = self.records.setdefault(key, HookRecord(name, expect_change=expect_change))

        def recorded(tensor: torch.Tensor, hook) -> torch.Tensor:
            before = tensor.detach().clone() if copy_input else tensor
            out = fn(tensor, hook)
            out = tensor if out is None else out
            if not isinstance(out, torch.Tensor):
                raise ShapeError(f"{self.description}: the hook on {name!r} returned {type(out).__name__}; a hook "
                                 "returns the (edited) tensor, or None after editing it in place")
            check_hook_output(out, before, name, self.description)
            record.note(before, out)
            return out

        self.fwd_hooks.append((name, recorded))

    def reset(self) -> None:
        for record in self.records.values():
            record.calls, record.changed, record.max_abs_change = 0, False, 0.0
            record.n_changed = record.n_masked = 0
            record.output_changed, record.non_float = None, False

    def bind(self, model: TransformerBridge) -> Intervention:
        """Mark this intervention as built for ``model``: :func:`intervene` refuses it on another architecture."""
        self.built_for = model_signature(model)
        return self

    def verify(self, on_no_effect: OnNoEffect = "raise") -> None:
        """Raise if a hook never fired or (per ``on_no_effect``, hook by hook) changed nothing."""
        check_on_no_effect(on_no_effect)
        if self.identity:
            return
        silent = [r.name for r in self.records.values() if r.calls == 0]
        if silent:
            which = f"hook {silent[0]!r}" if len(silent) == 1 else f"hooks {silent}"
            raise HookDidNotFireError(
                f"{self.description}: {which} never fired during the forward pass. Check the layer index, that "
                "no stop_at_layer/start_at_layer skips it, and that per-head results are enabled when hooking "
                "hook_result."
            )
        checked = [r for r in self.records.values() if r.expect_change]
        idle = [r.name for r in checked if not r.changed]
        unused = [r.name for r in checked if r.changed and r.output_changed is False]
        if unused and on_no_effect != "ignore":
            msg = (f"{self.description}: its hook(s) {unused} changed their tensor but the model's output is the same "
                   "as without the edit, so the computation does not consume that tensor (e.g. on OPT "
                   "pos_embed.hook_in carries the attention mask, not the positions). Hook the value the model "
                   "uses (hook_pos_embed, hook_embed, hook_resid_pre...), or pass on_no_effect='ignore' if an "
                   "unchanged output is expected.")
            if on_no_effect == "raise":
                raise InterventionNoEffectError(msg)
            warnings.warn(msg, stacklevel=3)
        if on_no_effect == "ignore" or not idle:
            return
        n = len(checked)
        which = (f"its hook {idle[0]!r} fired but left its tensor unchanged" if n == 1 else
                 f"its hooks fired but left every tensor unchanged ({idle})" if len(idle) == n else
                 f"{len(idle)} of its {n} hooks fired but left their tensor unchanged: {idle}")
        msg = (f"{self.description}: {which}, so the intervention had no effect there. If that is expected "
               "(e.g. patching a model with its own patterns), pass on_no_effect='ignore'; otherwise drop those "
               "hooks or check their layers and positions.")
        if on_no_effect == "raise":
            raise InterventionNoEffectError(msg)
        warnings.warn(msg, stacklevel=3)


def check_hook_output(out: torch.Tensor, before: torch.Tensor, name: str, description: str) -> None:
    """Refuse what a hook returns when the model cannot take it: another shape or dtype, or new NaN."""
    if out.shape != before.shape:
        raise ShapeError(f"{description}: the hook on {name!r} returned shape {tuple(out.shape)} for a tensor of "
                         f"shape {tuple(before.shape)}; return a tensor of the same shape (edit entries, e.g. "
                         "t[:, -1] = ..., rather than reshaping or reducing it).")
    if out.dtype != before.dtype:
        raise ShapeError(f"{description}: the hook on {name!r} returned dtype {out.dtype} for a {before.dtype} "
                         f"tensor; the model would compute in the wrong precision. Return out.to(tensor.dtype).")
    if out.is_floating_point():
        with torch.no_grad():
            if bool((torch.isnan(out) & ~torch.isnan(before)).any()):
                raise ShapeError(f"{description}: the hook on {name!r} wrote NaN into the tensor; every later "
                                 "activation and the logits would be NaN. Check the edit (a division by zero, a log "
                                 "of 0?), or mask attention with torch.finfo(dtype).min.")


def check_names_filter(model: TransformerBridge, names_filter) -> None:
    """Refuse a ``names_filter`` that caches nothing, or a list with names that are not hook points of ``model``.

    Example:
        >>> import factlens
        >>> from factlens.hooks import check_names_filter
        >>> check_names_filter(factlens.tiny("gpt2"), ["blocks.0.attn.hook_z", "blocks.9.attn.hook_z"])
        Traceback (most recent call last):
        ...
        factlens.errors.HookDidNotFireError: names_filter lists 1 name(s) that are not hook points of this model, so they would be missing from the cache: ['blocks.9.attn.hook_z'] (closest: ...). Build names with transformer_lens.utilities.get_act_name and the model's n_layers.
    """
    if names_filter is None:
        return
    known = model.hook_dict
    if isinstance(names_filter, str) or (isinstance(names_filter, (list, tuple, set)) and
                                         all(isinstance(n, str) for n in names_filter)):
        names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        if not names:
            raise HookDidNotFireError("names_filter is empty, so nothing would be cached; list the hooks you need "
                                      "(e.g. ['blocks.0.attn.hook_z']) or pass None for all of them.")
        bad = [n for n in names if n not in known]
        if bad:
            close = difflib.get_close_matches(bad[0], list(known), n=3)
            raise HookDidNotFireError(
                f"names_filter lists {len(bad)} name(s) that are not hook points of this model, so they would be "
                f"missing from the cache: {bad[:5]} (closest: {close}). Build names with "
                "transformer_lens.utilities.get_act_name and the model's n_layers.")
        return
    if callable(names_filter):
        if not any(names_filter(n) for n in known):
            raise HookDidNotFireError(
                f"names_filter {getattr(names_filter, '__name__', names_filter)!r} matches no hook point of this "
                "model, so the cache would be empty; check it against list(model.hook_dict) (e.g. "
                "lambda n: n.endswith('hook_z')).")
        return
    raise ConfigError(f"names_filter={names_filter!r:.60}; pass a hook name, a list of names, a function "
                      "name -> bool, or None.")


def model_signature(model: TransformerBridge) -> dict:
    """What an intervention, metric or run is bound to: the architecture and sizes of ``model``.

    Example:
        >>> import factlens
        >>> from factlens.hooks import model_signature
        >>> model_signature(factlens.tiny("gpt2"))
        {'family': 'gpt2', 'n_layers': 2, 'n_heads': 4, 'd_model': 64, 'd_vocab': 50257, 'n_ctx': 128}
    """
    cfg = model.cfg
    family = getattr(model, "factlens_family", None) or getattr(
        getattr(getattr(model, "original_model", None), "config", None), "model_type", None)
    return {"family": family, "n_layers": int(cfg.n_layers), "n_heads": int(cfg.n_heads),
            "d_model": int(cfg.d_model), "d_vocab": int(cfg.d_vocab), "n_ctx": int(cfg.n_ctx)}


def check_bound(model: TransformerBridge, interventions: Sequence[Intervention]) -> None:
    """Refuse an intervention built for a model of another architecture (its layers were resolved for that one)."""
    here = None
    for iv in interventions:
        if iv.built_for is None:
            continue
        here = here or model_signature(model)
        if iv.built_for != here:
            diff = ", ".join(f"{k}: {iv.built_for.get(k)} vs {here[k]}" for k in here if iv.built_for.get(k) != here[k])
            raise ArchitectureMismatchError(
                f"{iv.description} was built for another model ({diff}; built-for vs this one): its layers, heads "
                "and sizes were resolved for that model (layers=-1 there is another layer here). Build it again "
                "with this model, e.g. attend_to_self(model, layers=-1) or add_vector(model, ...).")


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


# ------------------------------------------------------------------------------------------ interventions
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


def hook(name: str, fn: HookFn, description: str | None = None) -> Intervention:
    """Wrap any TL hook function so :func:`intervene` checks it fired (and changed its tensor).

    ``fn(tensor, hook)`` may return a new tensor or edit ``tensor`` in place (returning it or ``None``).

    Example:
        >>> import factlens
        >>> from factlens import hook
        >>> model = factlens.tiny("gpt2")
        >>> def zero_head_0(z, hook):            # z: [batch, pos, head, d_head]
        ...     z[:, :, 0] = 0.0
        >>> with factlens.intervene(model, hook("blocks.0.attn.hook_z", zero_head_0)) as run:
        ...     _ = model(model.to_tokens("The capital of France is"))
        >>> run.records["blocks.0.attn.hook_z"].changed
        True
    """
    iv = Intervention(description or f"hook({name})")
    iv.key = ("hook", name, id(fn))
    iv.add(name, fn)
    return iv


def hooks_from_tl(model: TransformerBridge, fwd_hooks) -> Intervention:
    """One :class:`Intervention` from TransformerLens-style ``[(name, fn), ...]`` (or one ``(name, fn)`` pair).

    A name may also be a filter ``name -> bool`` (as in ``run_with_hooks``); it hooks every hook point whose
    name matches (each point once, under its first matching name).
    """
    pairs = [fwd_hooks] if _is_hook_pair(fwd_hooks) else list(fwd_hooks)
    iv = Intervention("hooks " + ", ".join(n if isinstance(n, str) else getattr(n, "__name__", "filter")
                                           for n, _ in (p if _is_hook_pair(p) else (p, None) for p in pairs)))
    iv.key = ("hooks", tuple((n if isinstance(n, str) else id(n), id(f)) for n, f in
                             (p if _is_hook_pair(p) else (p, None) for p in pairs)))
    for pair in pairs:
        if not _is_hook_pair(pair):
            raise ConfigError(f"{pair!r} is not a (hook name, hook function) pair; pass TransformerLens-style "
                              "hooks as [(name, fn), ...] or build interventions with factlens.hook(name, fn)")
        name, fn = pair
        if isinstance(name, str):
            iv.add(name, fn)
            continue
        seen: set[int] = set()
        matched = 0
        for hook_name, point in model.hook_dict.items():
            if name(hook_name) and id(point) not in seen:
                seen.add(id(point))
                iv.add(hook_name, fn)
                matched += 1
        if not matched:
            raise HookDidNotFireError(f"the hook filter {getattr(name, '__name__', name)!r} matches no hook point of "
                                      "this model; check it against list(model.hook_dict)")
    return iv


def _is_hook_pair(obj) -> bool:
    return (isinstance(obj, tuple) and len(obj) == 2 and (isinstance(obj[0], str) or callable(obj[0]))
            and callable(obj[1]))


def as_interventions(model: TransformerBridge, items: Sequence) -> list[Intervention]:
    """Interventions from what :func:`intervene` accepts: :class:`Intervention` objects and TL hook lists."""
    out = []
    for item in items:
        if isinstance(item, Intervention):
            out.append(item)
        elif _is_hook_pair(item) or (isinstance(item, list | tuple) and item
                                     and all(_is_hook_pair(p) for p in item)):
            out.append(hooks_from_tl(model, item))
        else:
            raise ConfigError(f"intervene got {type(item).__name__} {item!r:.80}; pass factlens interventions "
                              "(factlens.hook, patch_pattern, attend_to_self, add_vector...) or TransformerLens-style "
                              "[(hook_name, fn), ...] lists")
    return out


# ---------------------------------------------------------------------------------------------- running
@dataclass
class InterventionRun:
    """Handle yielded by :func:`intervene`: the interventions and their merged hook records."""

    interventions: list[Intervention]

    @property
    def records(self) -> HookRecords:
        """Hook name → :class:`HookRecord` over every intervention (a name hooked twice gets ``name #2``)."""
        out = HookRecords()
        for iv in self.interventions:
            for key, record in iv.records.items():
                k, n = key, 1
                while k in out:
                    n += 1
                    k = f"{record.name} #{n}"
                out[k] = record
        return out


def _check_names(model, interventions: Sequence[Intervention]) -> None:
    known = model.hook_dict
    for iv in interventions:
        for name, _ in iv.fwd_hooks:
            if name not in known:
                close = difflib.get_close_matches(name, list(known), n=3)
                raise HookDidNotFireError(
                    f"{iv.description}: {name!r} is not a hook point of this model, so it can never fire. "
                    f"Closest names: {close}. Build names with transformer_lens.utilities.get_act_name."
                )


@contextlib.contextmanager
def intervene(model: TransformerBridge, *interventions: Intervention | HookSpec | Sequence[HookSpec],
              on_no_effect: OnNoEffect = "raise") -> Iterator[InterventionRun]:
    """Install interventions for the duration of the block, then prove that each of their hooks took effect.

    Args:
        model: A TransformerLens bridge (prepared by factlens on first use).
        *interventions: factlens interventions, or TransformerLens-style hook lists ``[(name, fn), ...]``.
        on_no_effect: What to do, hook by hook, when a hook fired but changed nothing: ``"raise"``
            (:class:`~factlens.errors.InterventionNoEffectError` naming every such hook), ``"warn"`` or
            ``"ignore"``.

    Raises at the end of the block (see the module docstring). Works in eval and train mode; hook
    outputs stay in the autograd graph.

    Example:
        >>> import factlens
        >>> from factlens import intervene
        >>> model = factlens.tiny("gpt2")
        >>> tokens = model.to_tokens("The capital of France is")
        >>> with intervene(model, [("blocks.0.hook_mlp_out", lambda t, hook: 2 * t)]) as run:
        ...     logits = model(tokens)
        >>> run.records.to_dataframe()[["hook", "calls", "changed"]].values.tolist()
        [['blocks.0.hook_mlp_out', 1, True]]
    """
    from factlens.models import prepare

    check_on_no_effect(on_no_effect)
    if not getattr(model, "factlens_family", None):
        prepare(model)
    interventions = tuple(as_interventions(model, interventions))
    check_bound(model, interventions)  # before the names: a stale layer index is named as what it is
    _check_names(model, interventions)
    keys = _claim(model, interventions)
    try:
        for iv in interventions:
            iv.reset()
        fwd_hooks = [h for iv in interventions for h in iv.fwd_hooks]
        first: dict = {}

        def capture(module, args, kwargs, output) -> None:  # the first forward pass: replayed for the proof
            if not first:
                first.update(args=args, kwargs=kwargs, output=output)

        with contextlib.ExitStack() as stack:
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always", UserWarning)
            try:
                stack.enter_context(model.hooks(fwd_hooks=fwd_hooks))
            except ValueError as err:  # TL refuses e.g. hook_result without set_use_attn_result(True)
                raise HookDidNotFireError(f"TransformerLens refused a hook, so it could never fire: {err}") from err
            if any(_needs_output_proof(name) for name, _ in fwd_hooks):
                stack.callback(model.register_forward_hook(capture, with_kwargs=True).remove)
            yield InterventionRun(list(interventions))
        for w in caught:
            if "edit is discarded" in str(w.message):
                raise InterventionNoEffectError(
                    f"TransformerLens discarded an edit: {w.message} Call factlens.prepare(model) on this bridge "
                    "(factlens.load/tiny do it for you) so pattern and score edits reach the computation."
                )
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        _prove_on_output(model, interventions, first)
    finally:
        _release(model, keys)
    for iv in interventions:
        iv.verify(on_no_effect)


_ACTIVE = "_factlens_active_edits"


def _claim(model: TransformerBridge, interventions: Sequence[Intervention]) -> list:
    """Register the interventions as active on ``model``; refuse one already active (it would apply twice)."""
    active = model.__dict__.setdefault(_ACTIVE, {})
    keys = []
    for iv in interventions:
        if iv.identity:
            continue
        key = iv.key if iv.key is not None else ("object", id(iv))
        if key in active or key in keys:
            where = "twice in one call" if key in keys else "in an enclosing intervene/mitigate block"
            raise ConfigError(
                f"{iv.description} is already applied {where}; applying it again would stack the same edit (e.g. "
                "subtract the intercept twice). Pass each edit once: leave the inner block out, or build a "
                "different edit (e.g. add_vector(..., coeff=2) for a double step).")
        keys.append(key)
    for key, iv in zip(keys, [iv for iv in interventions if not iv.identity], strict=True):
        active[key] = iv.description
    return keys


def _release(model: TransformerBridge, keys: list) -> None:
    active = model.__dict__.get(_ACTIVE, {})
    for key in keys:
        active.pop(key, None)


def _needs_output_proof(name: str) -> bool:
    """Hook points whose tensor may not be what the model computes with: a component's input (``hook_in``),
    which a component can ignore (OPT's position embedding gets the attention mask there)."""
    return name.endswith("hook_in") or "mask" in name


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return [v for v in getattr(out, "values", lambda: [])() if isinstance(v, torch.Tensor)]


def _prove_on_output(model: TransformerBridge, interventions: Sequence[Intervention], first: dict) -> None:
    """For edits of tensors the model may not consume, compare the first forward's output with a clean replay.

    Sets ``output_changed`` on the records of those hooks; :meth:`Intervention.verify` refuses a changed tensor
    whose output did not move.
    """
    records = [r for iv in interventions for r in iv.records.values()
               if r.changed and (_needs_output_proof(r.name) or r.non_float)]
    if not records or not first:
        return
    kwargs = first["kwargs"]
    if any("cache" in k or "past" in k for k in kwargs):  # incremental decoding: a replay would reuse the cache
        return
    edited = _outputs(first["output"])
    if not edited:
        return
    try:
        with torch.no_grad():
            clean = _outputs(model(*first["args"], **kwargs))
    except Exception:  # a replay that cannot run proves nothing either way
        return
    same = len(clean) == len(edited) and all(
        a.shape == b.shape and bool(torch.allclose(a.detach().float(), b.detach().float(), rtol=CHANGE_RTOL,
                                                   atol=CHANGE_ATOL, equal_nan=True))
        for a, b in zip(edited, clean, strict=True))
    for r in records:
        r.output_changed = not same


def run_with_interventions(model: TransformerBridge, tokens,
                           *interventions: Intervention | HookSpec | Sequence[HookSpec],
                           on_no_effect: OnNoEffect = "raise", fwd_hooks: Sequence[HookSpec] = (),
                           **forward_kwargs):
    """``model(tokens, **forward_kwargs)`` under :func:`intervene`; returns the model's output.

    ``fwd_hooks=[(name, fn), ...]`` is accepted as in TransformerLens's ``run_with_hooks``.

    Example:
        >>> import factlens
        >>> from factlens import run_with_interventions
        >>> model = factlens.tiny("gpt2")
        >>> logits = run_with_interventions(model, model.to_tokens("Hi"),
        ...                                 fwd_hooks=[("blocks.1.hook_resid_post", lambda t, hook: t * 0.5)])
    """
    extra = [list(fwd_hooks)] if fwd_hooks else []
    with intervene(model, *interventions, *extra, on_no_effect=on_no_effect):
        return model(tokens, **forward_kwargs)
