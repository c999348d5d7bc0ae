"""Running interventions: install them for a block, then prove that each of their hooks took effect.

:func:`intervene` installs :class:`~factlens.hooks.Intervention` objects (from :mod:`factlens.edits`,
:func:`~factlens.hooks.hook`) or TransformerLens-style ``[(name, fn), ...]`` lists for the duration of a
``with`` block and, when the block ends, raises

- :class:`~factlens.errors.HookDidNotFireError` if a hook never ran (wrong name, ``stop_at_layer``...),
- :class:`~factlens.errors.InterventionNoEffectError` if a hook ran but left its tensor unchanged, if it
  changed a tensor the model does not consume (a component's ``hook_in``, a mask: the first forward pass is
  compared with a clean replay), or if TransformerLens reported that an edit was discarded.

An edit already active on the model (in an enclosing block, or passed twice) is refused: it would apply twice.
Interventions that are the identity by construction install no hook and skip the checks; for an edit that is
the identity by accident, pass ``on_no_effect="ignore"`` or ``"warn"``. :func:`run_with_interventions` is one
forward pass under :func:`intervene`.

Example:
    >>> import factlens
    >>> from factlens.intervening import intervene
    >>> model = factlens.tiny("opt")
    >>> tokens = model.to_tokens("The capital of France is")
    >>> with intervene(model, factlens.attend_to_self(model, layers=-1, positions=-1)) as run:
    ...     logits = model(tokens)
    >>> run.records["blocks.1.attn.hook_attn_scores"].calls
    1
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from factlens.errors import ConfigError, HookDidNotFireError, InterventionNoEffectError
from factlens.hooks import (
    CHANGE_ATOL,
    CHANGE_RTOL,
    HookRecords,
    HookSpec,
    Intervention,
    OnNoEffect,
    as_interventions,
    check_bound,
    check_on_no_effect,
)

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@dataclass
class InterventionRun:
    """Handle yielded by :func:`intervene`: the interventions and their merged hook records."""

    interventions: list[Intervention]

    @property
    def records(self) -> HookRecords:
        """Hook name → :class:`~factlens.hooks.HookRecord` over every intervention (a name hooked twice gets ``name #2``)."""
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

    Sets ``output_changed`` on the records of those hooks; :meth:`~factlens.hooks.Intervention.verify` refuses a changed tensor
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
