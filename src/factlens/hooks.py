"""Interventions and the records that prove they ran: the types and checks every factlens edit shares.

Every factlens edit of a forward pass is an :class:`Intervention`. Interventions are plain TransformerLens
hooks (``fn(tensor, hook)`` on TL hook names such as ``blocks.3.attn.hook_pattern``) wrapped with a
:class:`HookRecord` that counts calls and notes whether the tensor changed. :func:`hook` and
:func:`hooks_from_tl` wrap any TL hook function; :mod:`factlens.edits` builds the pattern patches, score edits
and vector additions of the papers; :func:`~factlens.intervening.intervene` installs them and, when the block
ends, raises

- :class:`~factlens.errors.HookDidNotFireError` if a hook never ran (wrong name, ``stop_at_layer``...),
- :class:`~factlens.errors.InterventionNoEffectError` if a hook ran but left its tensor unchanged, or if
  TransformerLens reported that an edit was discarded (the OPT post-hoc pattern trap; factlens-prepared
  bridges never hit it, see :mod:`factlens.attention`).

Interventions that are the identity by construction (an empty head list, a zero vector, ``coeff=0``)
install no hook and skip the checks. For an edit that is the identity by accident (patching a model with
its own patterns), pass ``on_no_effect="ignore"`` or ``"warn"``.

Example:
    >>> import factlens
    >>> from factlens.hooks import hook
    >>> model = factlens.tiny("gpt2")
    >>> edit = hook("blocks.0.hook_mlp_out", lambda t, hook: 2 * t)
    >>> with factlens.intervene(model, edit):
    ...     logits = model(model.to_tokens("The capital of France is"))
    >>> record = edit.records["blocks.0.hook_mlp_out"]
    >>> record.calls, record.changed
    (1, True)
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from factlens.errors import (
    ArchitectureMismatchError,
    ConfigError,
    HookDidNotFireError,
    InterventionNoEffectError,
    ShapeError,
)
from factlens.inputs import at_least_fp32

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

OnNoEffect = Literal["raise", "warn", "ignore"]
ON_NO_EFFECT = ("raise", "warn", "ignore")
CHANGE_RTOL, CHANGE_ATOL = 1e-5, 1e-6  # a hook "changed" its tensor where torch.isclose(new, old) fails
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
    """What happened at one hook point during an :func:`~factlens.intervening.intervene` block.

    Attributes:
        name: The TL hook name.
        calls: How often the hook ran.
        changed: Whether any call changed its tensor beyond float noise (``torch.isclose``).
        max_abs_change: The largest change among entries that are finite on both sides and not at the dtype's
            masking value (``torch.finfo(dtype).min``): a real size, never the mask fill.
        n_changed: Entries changed, summed over calls.
        n_masked: Of those, entries set to (or from) ``±inf``, NaN or the masking value: masking edits such as
            :func:`~factlens.edits.attend_to_self` change scores only this way.
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

    Build them with :func:`~factlens.edits.patch_pattern`, :func:`~factlens.edits.edit_scores`,
    :func:`~factlens.edits.attend_to_self`, :func:`~factlens.edits.add_vector` or :func:`hook`; run them with
    :func:`~factlens.intervening.intervene` or :func:`~factlens.intervening.run_with_interventions`.
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
        """Mark this intervention as built for ``model``: :func:`~factlens.intervening.intervene` refuses it on another architecture."""
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


def hook(name: str, fn: HookFn, description: str | None = None) -> Intervention:
    """Wrap any TL hook function so :func:`~factlens.intervening.intervene` checks it fired (and changed its tensor).

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
    """Interventions from what :func:`~factlens.intervening.intervene` accepts: :class:`Intervention` objects and TL hook lists."""
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
