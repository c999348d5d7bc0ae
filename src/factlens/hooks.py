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
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int

from factlens.errors import ConfigError, HookDidNotFireError, InterventionNoEffectError, ShapeError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

OnNoEffect = Literal["raise", "warn", "ignore"]
CHANGE_RTOL, CHANGE_ATOL = 1e-5, 1e-6  # a hook "changed" its tensor where torch.isclose(new, old) fails
Positions = int | Sequence[int] | Int[torch.Tensor, " batch"] | None



def act_name(kind: str, layer: int | None = None) -> str:
    """TransformerLens's hook name for ``kind`` at ``layer`` (``transformer_lens.utilities.get_act_name``,
    imported on first use so that ``import factlens`` does not load TransformerLens)."""
    from transformer_lens.utilities import get_act_name

    return get_act_name(kind, layer)

@dataclass
class HookRecord:
    """What happened at one hook point during an :func:`intervene` block."""

    name: str
    calls: int = 0
    changed: bool = False
    max_abs_change: float = 0.0


@dataclass
class Intervention:
    """A set of TL forward hooks plus the records that prove they ran.

    Build them with :func:`patch_pattern`, :func:`edit_scores`, :func:`attend_to_self`,
    :func:`add_vector` or :func:`hook`; run them with :func:`intervene` or :func:`run_with_interventions`.
    """

    description: str
    fwd_hooks: list[tuple[str, Callable]] = field(default_factory=list)
    identity: bool = False  # the identity by construction: no hooks, no checks
    records: dict[str, HookRecord] = field(default_factory=dict)

    def add(self, name: str, fn: Callable[[torch.Tensor, object], torch.Tensor | None]) -> None:
        """Add a hook on TL hook ``name``; the call and the change are recorded."""
        record = self.records.setdefault(name, HookRecord(name))

        def recorded(tensor: torch.Tensor, hook) -> torch.Tensor:
            out = fn(tensor, hook)
            out = tensor if out is None else out
            record.calls += 1
            if out.shape != tensor.shape:
                record.changed = True
            else:
                with torch.no_grad():
                    a, b = out.detach().float(), tensor.detach().float()
                    # elementwise closeness: float noise (the same pattern from SDPA vs an explicit softmax) is
                    # not a change, and masked entries (finfo.min or -inf, equal on both sides) never swamp it
                    close = torch.isclose(a, b, rtol=CHANGE_RTOL, atol=CHANGE_ATOL)
                    changed = not bool(close.all())
                    diff = (a - b).abs().masked_fill(close, 0.0)
                    delta = float(diff.nan_to_num(nan=float("inf")).max()) if changed else 0.0
                if changed:
                    record.changed = True
                    record.max_abs_change = max(record.max_abs_change, delta)
            return out

        self.fwd_hooks.append((name, recorded))

    def reset(self) -> None:
        for record in self.records.values():
            record.calls, record.changed, record.max_abs_change = 0, False, 0.0

    def verify(self, on_no_effect: OnNoEffect = "raise") -> None:
        """Raise if a hook never fired or (per ``on_no_effect``) changed nothing."""
        if self.identity:
            return
        for record in self.records.values():
            if record.calls == 0:
                raise HookDidNotFireError(
                    f"{self.description}: hook {record.name!r} never fired during the forward pass. Check the "
                    "layer index, that no stop_at_layer/start_at_layer skips it, and that per-head results "
                    "are enabled when hooking hook_result."
                )
        if on_no_effect != "ignore" and not any(r.changed for r in self.records.values()):
            msg = (
                f"{self.description}: its hooks fired but left every tensor unchanged, so the intervention "
                "had no effect. If that is expected (e.g. patching a model with its own patterns), pass "
                "on_no_effect='ignore'."
            )
            if on_no_effect == "raise":
                raise InterventionNoEffectError(msg)
            warnings.warn(msg, stacklevel=3)


# ----------------------------------------------------------------------------------------------- indices
def resolve_layers(model: TransformerBridge, layers: int | Sequence[int] | None) -> list[int]:
    """Layer indices (negative counts from the end); ``None`` = all. Raises ConfigError when out of range."""
    n = model.cfg.n_layers
    if layers is None:
        return list(range(n))
    items = [layers] if isinstance(layers, int) else list(layers)
    out = []
    for layer in items:
        if not -n <= int(layer) < n:
            raise ConfigError(f"layer {layer} is out of range for a model with {n} layers; use 0..{n - 1} or -1.")
        out.append(int(layer) % n)
    return out


def resolve_heads(model: TransformerBridge, heads: int | Sequence[int] | None) -> list[int] | None:
    """Head indices; ``None`` = all heads (returned as None). Raises ConfigError when out of range."""
    if heads is None:
        return None
    n = model.cfg.n_heads
    items = [heads] if isinstance(heads, int) else list(heads)
    for h in items:
        if not -n <= int(h) < n:
            raise ConfigError(f"head {h} is out of range for a model with {n} heads per layer; use 0..{n - 1}.")
    return [int(h) % n for h in items]


def _rows_and_positions(positions: Positions, batch: int, seq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors (rows, pos) selecting the edited positions of a [batch, seq, ...] tensor."""
    if positions is None:
        rows = torch.arange(batch, device=device).repeat_interleave(seq)
        return rows, torch.arange(seq, device=device).repeat(batch)
    if isinstance(positions, torch.Tensor) and positions.ndim == 1 and len(positions) == batch and batch > 1:
        pos = positions.to(device).long()
        return torch.arange(batch, device=device), pos % seq
    items = torch.as_tensor([positions] if isinstance(positions, int) else list(positions), device=device).long()
    if ((items < -seq) | (items >= seq)).any():
        raise ConfigError(f"position(s) {items.tolist()} out of range for sequence length {seq}.")
    items = items % seq
    rows = torch.arange(batch, device=device).repeat_interleave(len(items))
    return rows, items.repeat(batch)


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


def _check_pattern(src: torch.Tensor, target: torch.Tensor, where: str) -> None:
    if src.shape != target.shape:
        raise ShapeError(f"{where}: pattern of shape {tuple(src.shape)} where the model's is {tuple(target.shape)} "
                         "[batch, head, query, key]; run the reference on the same tokens.")
    if src.device != target.device:
        raise ShapeError(f"{where}: pattern on {src.device} but the model runs on {target.device}; move it with .to().")
    if not src.is_floating_point():
        raise ShapeError(f"{where}: pattern has dtype {src.dtype}; pass a floating-point attention pattern.")
    if not torch.isfinite(src).all():
        raise ShapeError(f"{where}: pattern contains NaN or inf; check the reference model's forward pass.")
    row_sums = src.float().sum(-1)
    if (row_sums - 1).abs().max() > 1e-3:
        raise ShapeError(f"{where}: pattern rows must sum to 1 (post-softmax); found sums in "
                         f"[{row_sums.min():.3f}, {row_sums.max():.3f}]. Pass hook_pattern, not hook_attn_scores.")


def patch_pattern(model: TransformerBridge, source: PatternSource, *, layers: int | Sequence[int] | None = None,
                  heads: int | Sequence[int] | None = None, positions: Positions = None,
                  detach: bool = True) -> Intervention:
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

    Example:
        >>> import torch, factlens
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> tokens = model.to_tokens("The capital of France is")
        >>> _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
        >>> edit = patch_pattern(model, cache)       # every layer, every head
    """
    layer_ids = resolve_layers(model, layers)
    head_ids = resolve_heads(model, heads)
    iv = Intervention(f"patch_pattern(layers={layer_ids}, heads={head_ids or 'all'})")
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
                raise ShapeError(f"patch_pattern: the source has no pattern for layer {layer} ({name!r}).")
            _check_pattern(new, pattern, name)
            new = new.detach() if detach else new
            new = new.to(pattern.dtype)
            if head_ids is None and positions is None:
                return new
            sel = selection_mask(pattern.shape, head_ids, positions, pattern.device)  # [b, h, q]
            return torch.where(sel[..., None], new, pattern)

        iv.add(name, fn)
    return iv


def edit_scores(model: TransformerBridge, fn: Callable[[torch.Tensor, int], torch.Tensor], *,
                layers: int | Sequence[int] | None = None, description: str = "edit_scores") -> Intervention:
    """Edit the pre-softmax, post-mask attention scores (``hook_attn_scores``) with ``fn(scores, layer)``.

    On GPT-2 and on factlens-prepared OPT bridges the hook is genuinely pre-softmax.
    """
    iv = Intervention(description)
    for layer in resolve_layers(model, layers):
        iv.add(act_name("attn_scores", layer), lambda s, hook, layer=layer: fn(s, layer))
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
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> from factlens.recall.datasets import dataset_for
        >>> dataset = dataset_for(model)
        >>> edit = attend_to_self(model, layers=-1, positions=dataset.end)
    """
    head_ids = resolve_heads(model, heads)
    layer_ids = resolve_layers(model, layers)
    if head_ids == [] or not layer_ids:
        return Intervention("attend_to_self (no heads)", identity=True)

    def fn(scores: torch.Tensor, layer: int) -> torch.Tensor:  # [b, h, q, k]
        _, _, q, k = scores.shape
        sel = selection_mask(scores.shape, head_ids, positions, scores.device)  # [b, h, q]
        keys = torch.arange(k, device=scores.device)
        not_self = keys[None, :] != (torch.arange(q, device=scores.device) + (k - q))[:, None]  # [q, k]
        floor = torch.finfo(scores.dtype).min
        open_keys = scores > floor  # keys the causal mask has not already closed (-inf or dtype-min)
        return scores.masked_fill(sel[..., None] & not_self & open_keys, floor)

    return edit_scores(model, fn, layers=layer_ids,
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
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> from factlens.recall.datasets import dataset_for
        >>> dataset = dataset_for(model)
        >>> intercept = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
        >>> edit = add_vector(model, -intercept, layer=-1, component="mlp_out", positions=dataset.end)
    """
    if hook_name is None:
        hook_name = act_name(component, resolve_layers(model, layer)[0])
    if not torch.isfinite(vector).all():
        raise ShapeError("add_vector: the vector contains NaN or inf.")
    if vector.shape[-1] != model.cfg.d_model:
        raise ShapeError(f"add_vector: vector has size {vector.shape[-1]}, the model's d_model is {model.cfg.d_model}.")
    iv = Intervention(f"add_vector({hook_name}, coeff={coeff})")
    if coeff == 0 or not bool(vector.any()):
        iv.identity = True
        return iv

    def fn(t: torch.Tensor, hook) -> torch.Tensor:  # [b, p, d]
        v = (coeff * vector).to(device=t.device, dtype=t.dtype)
        rows, pos = _rows_and_positions(positions, t.shape[0], t.shape[1], t.device)
        out = t.clone()
        if v.ndim == 1:
            out[rows, pos] = out[rows, pos] + v
        else:
            if v.shape[0] != t.shape[0]:
                raise ShapeError(f"add_vector: per-prompt vector has batch {v.shape[0]}, the input {t.shape[0]}.")
            out[rows, pos] = out[rows, pos] + v[rows]
        return out

    iv.add(hook_name, fn)
    return iv


def hook(name: str, fn: Callable[[torch.Tensor, object], torch.Tensor | None], description: str | None = None) -> Intervention:
    """Wrap any TL hook function so :func:`intervene` checks it fired (and changed its tensor)."""
    iv = Intervention(description or f"hook({name})")
    iv.add(name, fn)
    return iv


# ---------------------------------------------------------------------------------------------- running
@dataclass
class InterventionRun:
    """Handle yielded by :func:`intervene`: the interventions and their merged hook records."""

    interventions: list[Intervention]

    @property
    def records(self) -> dict[str, HookRecord]:
        out: dict[str, HookRecord] = {}
        for iv in self.interventions:
            out.update(iv.records)
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
def intervene(model: TransformerBridge, *interventions: Intervention, on_no_effect: OnNoEffect = "raise") -> Iterator[InterventionRun]:
    """Install interventions for the duration of the block, then prove they took effect.

    Raises at the end of the block (see the module docstring). Works in eval and train mode; hook
    outputs stay in the autograd graph.

    Example:
        >>> import torch, factlens
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> tokens = model.to_tokens("The capital of France is")
        >>> with intervene(model, attend_to_self(model)) as run:
        ...     logits = model(tokens)
    """
    from factlens.models import prepare

    if not getattr(model, "factlens_family", None):
        prepare(model)
    _check_names(model, interventions)
    for iv in interventions:
        iv.reset()
    fwd_hooks = [h for iv in interventions for h in iv.fwd_hooks]
    with contextlib.ExitStack() as stack:
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always", UserWarning)
        try:
            stack.enter_context(model.hooks(fwd_hooks=fwd_hooks))
        except ValueError as err:  # TL refuses e.g. hook_result without set_use_attn_result(True)
            raise HookDidNotFireError(f"TransformerLens refused a hook, so it could never fire: {err}") from err
        yield InterventionRun(list(interventions))
    for w in caught:
        if "edit is discarded" in str(w.message):
            raise InterventionNoEffectError(
                f"TransformerLens discarded an edit: {w.message} Call factlens.prepare(model) on this bridge "
                "(factlens.load/tiny do it for you) so pattern and score edits reach the computation."
            )
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    for iv in interventions:
        iv.verify(on_no_effect)


def run_with_interventions(model: TransformerBridge, tokens, *interventions: Intervention, on_no_effect: OnNoEffect = "raise",
                           **forward_kwargs):
    """``model(tokens, **forward_kwargs)`` under :func:`intervene`; returns the model's output."""
    with intervene(model, *interventions, on_no_effect=on_no_effect):
        return model(tokens, **forward_kwargs)
