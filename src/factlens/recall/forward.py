"""The forward pass every :mod:`factlens.recall` analysis reads: activations at each prompt's ``end`` only.

:func:`run_at_end` runs a dataset in chunks and keeps **only** the ``end`` position of the logits and of the
hooked activations (an :class:`EndRun`), so full-size models on a few hundred prompts fit comfortably in
memory. Each analysis declares the hooks it reads (``*_hooks(model)``); given a shared ``run=``, it reads them
through :func:`reuse_run`, which refuses a run that lacks one or was made on other prompts, so one cached pass
can serve several analyses (:func:`factlens.recall.report.analyze`) and never silently falls back to another.

The module also reads the model's parameters the way the analyses need them: :func:`unembed_params` (the
unembedding with the final LayerNorm's weight folded in), :func:`center` (LayerNorm's centring) and
:func:`head_outputs` (each head's own output).

Example:
    >>> import factlens
    >>> from factlens.recall.datasets import dataset_for
    >>> from factlens.recall.forward import run_at_end
    >>> model = factlens.tiny("gpt2")
    >>> ds = dataset_for(model)
    >>> run = run_at_end(model, ds, ["blocks.1.hook_mlp_out"])
    >>> run.logits.shape, run["blocks.1.hook_mlp_out"].shape
    (torch.Size([225, 50257]), torch.Size([225, 64]))
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int

from factlens.errors import ConfigError, HookDidNotFireError, ModeError
from factlens.hooks import Intervention, OnNoEffect
from factlens.intervening import intervene
from factlens.loading import require_compat
from factlens.recall.datasets import RelationDataset, check_dataset
from factlens.resources import track

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

InterventionFactory = Callable[[Int[torch.Tensor, " b"], Int[torch.Tensor, " b"]], Sequence[Intervention]]


# ---------------------------------------------------------------------------------------------- model reading
def require_eval(model: TransformerBridge, operation: str = "this analysis") -> None:
    """Raise :class:`~factlens.errors.ModeError` when any submodule of ``model`` is in training mode, or when the
    model is not in compatibility mode (every Lv analysis calls this: :func:`factlens.loading.require_compat`)."""
    roots = [model, getattr(model, "original_model", None)]
    for root in roots:
        if isinstance(root, torch.nn.Module):
            for name, module in root.named_modules():
                if module.training:
                    raise ModeError(f"{operation} needs the model in eval mode, but {name or '<root>'!r} is in "
                                    "training mode (dropout would make runs disagree); call model.eval() first.")
    require_compat(model, operation)




def unembed_params(model: TransformerBridge) -> tuple[Float[torch.Tensor, "d vocab"], Float[torch.Tensor, " vocab"]]:
    """``(W_eff, b_eff)`` with ``logits = normalized @ W_eff + b_eff`` for the centred, scaled residual.

    ``normalized = (x − mean x) / ln_final.hook_scale``. The final LayerNorm's own weight and bias are folded
    in, so the same formula holds with and without TL compatibility mode. Used for direct logit attribution
    and for reading vectors (intercepts) through the unembedding.
    """
    ln = model.ln_final
    comp = getattr(ln, "original_component", None)
    W_U = model.W_U  # [d, vocab]
    w = getattr(comp, "weight", None)
    b = getattr(comp, "bias", None)
    W_eff = W_U if w is None else w[:, None] * W_U
    b_eff = model.b_U if b is None else b @ W_U + model.b_U
    return W_eff.detach(), b_eff.detach()


def center(x: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
    """Remove the all-ones component (what LayerNorm's centring removes)."""
    return x - x.mean(-1, keepdim=True)


def head_outputs(model: TransformerBridge, layer: int, z: Float[torch.Tensor, "n head d_head"]) -> Float[torch.Tensor, "n head d_model"]:
    """Each head's own output ``z·W_O[h]`` at ``layer``, **without** ``b_O`` (the shared bias belongs to no head).

    Summed over heads and plus ``b_O``, this is ``hook_attn_out``; it works on GPT-2 and OPT without
    ``set_use_attn_result``.

    Example:
        >>> import torch, factlens
        >>> from factlens.recall.forward import head_outputs
        >>> model = factlens.tiny("gpt2")
        >>> _, cache = model.run_with_cache(model.to_tokens("The capital of France is"))
        >>> out = head_outputs(model, 0, cache["blocks.0.attn.hook_z"][0])          # [pos, head, d_model]
        >>> bool(torch.allclose(out.sum(1) + model.blocks[0].attn.b_O, cache["blocks.0.hook_attn_out"][0], atol=1e-5))
        True
    """
    return torch.einsum("nhk,hkd->nhd", z, model.blocks[layer].attn.W_O.detach().to(z.dtype))  # [n, H, d]


@dataclass
class EndRun:
    """Logits and hooked activations of a dataset, at each prompt's ``end`` only.

    Attributes:
        logits: ``[n, vocab]`` at ``end`` (None when not requested).
        acts: TL hook name → activation at ``end``: ``[n, ...]`` with the position axis removed; attention
            hooks (``hook_pattern``/``hook_attn_scores``) keep ``[n, head, key]`` for the query at ``end``, over
            the dataset's full width (keys past a prompt's chunk: pattern 0, scores ``finfo.min``).
        dataset_key: :func:`dataset_key` of the prompts it was run on (None: unknown, e.g. built by hand).
    """

    logits: Float[torch.Tensor, "n vocab"] | None
    acts: dict[str, torch.Tensor] = field(default_factory=dict)
    dataset_key: str | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.acts:
            raise ConfigError(f"{name!r} was not captured; pass it in names= (captured: {sorted(self.acts)})")
        return self.acts[name]

    def stack(self, template: str, n_layers: int) -> torch.Tensor:
        """``template.format(layer)`` for every layer stacked on axis 1, e.g. ``[n, layer, head, d_head]``."""
        return torch.stack([self[template.format(layer)] for layer in range(n_layers)], dim=1)


def dataset_key(dataset: RelationDataset) -> str:
    """A digest of a dataset's tokens and ``end`` positions: which prompts an :class:`EndRun` holds."""
    digest = hashlib.sha256()
    for t in (dataset.tokens, dataset.end):
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def reuse_run(model: TransformerBridge, dataset: RelationDataset, run: EndRun | None, names: Iterable[str], *,
              logits: bool = False, max_batch: int = 64, progress: bool = False, desc: str = "forward") -> EndRun:
    """``run`` when it holds every hook in ``names`` (and logits if asked) for ``dataset``; a new
    :func:`run_at_end` pass when ``run`` is None.

    Every analysis reads its declared hooks through this, so a shared run either serves it or is refused.

    Raises:
        ConfigError: ``run`` lacks a hook or the logits (names them and the fix), or holds other prompts.

    Example:
        >>> import factlens
        >>> from factlens.recall.datasets import dataset_for
        >>> from factlens.recall.forward import reuse_run, run_at_end
        >>> model = factlens.tiny("gpt2")
        >>> ds = dataset_for(model, n=8)
        >>> run = run_at_end(model, ds, ["ln_final.hook_scale"])
        >>> reuse_run(model, ds, run, ["ln_final.hook_scale"], logits=True) is run
        True
    """
    names = list(dict.fromkeys(names))
    if run is None:
        return run_at_end(model, dataset, names, logits=logits, max_batch=max_batch, progress=progress, desc=desc)
    rows = next(iter(run.acts.values())).shape[0] if run.acts else len(run.logits if run.logits is not None else dataset)
    if rows != len(dataset) or (run.dataset_key is not None and run.dataset_key != dataset_key(dataset)):
        raise ConfigError(f"the shared run was made on other prompts ({rows} rows) than this dataset "
                          f"({len(dataset)} prompts) for {desc}; pass the run of the same dataset, or run=None")
    missing = [name for name in names if name not in run.acts]
    if missing or (logits and run.logits is None):
        what = missing + (["the logits"] if logits and run.logits is None else [])
        raise ConfigError(f"the shared run lacks {what} that {desc} reads; capture them: run_at_end(model, dataset, "
                          "names) with the analysis's declared hooks (e.g. report.shared_hooks(model)), or pass run=None")
    return run


def _at_end(name: str, t: torch.Tensor, ends: torch.Tensor, width: int) -> torch.Tensor:
    rows = torch.arange(t.shape[0], device=t.device)
    if name.endswith(("hook_pattern", "hook_attn_scores")):  # [b, h, q, k] -> [b, h, width]
        row = t[rows, :, ends.to(t.device)]
        fill = 0.0 if name.endswith("hook_pattern") else torch.finfo(t.dtype).min  # keys past the chunk
        return torch.nn.functional.pad(row, (0, width - row.shape[-1]), value=fill)
    return t[rows, ends.to(t.device)]


def run_at_end(model: TransformerBridge, dataset: RelationDataset, names: Iterable[str] = (), *,
               interventions: Sequence[Intervention] | InterventionFactory | None = None,
               logits: bool = True, max_batch: int = 64, progress: bool = False,
               on_no_effect: OnNoEffect = "raise", desc: str = "forward") -> EndRun:
    """Run ``dataset`` in chunks and keep logits and ``names`` activations at each prompt's ``end`` only.

    Args:
        names: TL hook names to capture (``blocks.3.attn.hook_z``, ``ln_final.hook_scale``...).
        interventions: factlens interventions active during the runs, or a factory
            ``(rows, ends) -> interventions`` called per chunk (``rows``: prompt indices, ``ends``: their
            ``end`` positions), for edits whose positions depend on the prompts (``positions=ends``).
        logits: compute logits (only at the ``end`` positions, via ``logits_to_keep``).
        max_batch: prompts per forward pass. Chunks group prompts of similar length (sorted by ``end``), so a
            chunk's ``rows`` are not a contiguous range; the results are in dataset order.
        on_no_effect: passed to :func:`factlens.intervene`.

    Example:
        >>> import torch, factlens
        >>> from factlens.recall.forward import run_at_end
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> from factlens.recall.datasets import dataset_for
        >>> ds = dataset_for(model)
        >>> run = run_at_end(model, ds, ["blocks.1.hook_mlp_out"])
        >>> run["blocks.1.hook_mlp_out"].shape
        torch.Size([225, 64])
    """
    require_eval(model, "run_at_end")
    check_dataset(model, dataset, "run_at_end")  # another tokenizer's ids, or OPT prompts without their BOS
    names = list(dict.fromkeys(names))
    if max_batch < 1:
        raise ConfigError(f"max_batch={max_batch}; pass max_batch >= 1")
    known = model.hook_dict
    for name in names:
        if name not in known:
            raise HookDidNotFireError(f"{name!r} is not a hook point of this model; build names with "
                                      "transformer_lens.utilities.get_act_name")
    device = model.cfg.device
    n = len(dataset)
    stored: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    out_logits: list[torch.Tensor] = []
    # chunks of prompts of similar length: each chunk is trimmed after its longest prompt (less padding to run)
    # and keeps logits at few distinct ``end`` columns; results go back to dataset order below
    order = torch.argsort(dataset.end, stable=True)
    starts = range(0, n, max_batch)
    for start in track(starts, device=device, desc=desc, disable=not progress, leave=False):
        rows = order[start : start + max_batch]
        ends = dataset.end[rows]
        tokens = dataset.tokens[rows, : int(ends.max()) + 1].to(device)  # right padding: trimming is safe
        calls = dict.fromkeys(names, 0)

        def capture(t: torch.Tensor, hook, name: str, ends=ends, calls=calls) -> None:
            stored[name].append(_at_end(name, t, ends, dataset.tokens.shape[1]).detach())
            calls[name] += 1

        fwd = [(name, lambda t, hook, name=name: capture(t, hook, name)) for name in names]
        ivs = list(interventions(rows, ends) if callable(interventions) else (interventions or ()))
        keep = torch.unique(ends)
        # without logits, the unembedding still runs in HF's forward: on one position instead of all of them
        kwargs = {"logits_to_keep": keep.to(device)} if logits else {"return_type": None, "logits_to_keep": 1}
        with torch.no_grad(), intervene(model, *ivs, on_no_effect=on_no_effect), model.hooks(fwd_hooks=fwd):
            out = model(tokens, **kwargs)
        for name, c in calls.items():
            if c != 1:
                raise HookDidNotFireError(f"capture hook {name!r} fired {c} times in one forward pass (expected 1)")
        if logits:
            col = torch.searchsorted(keep, ends).to(out.device)
            out_logits.append(out[torch.arange(len(rows), device=out.device), col])
    back = torch.empty_like(order)
    back[order] = torch.arange(n)  # chunk order -> dataset order
    acts = {name: torch.cat(chunks)[back.to(chunks[0].device)] for name, chunks in stored.items()}
    at_end = torch.cat(out_logits)[back.to(out_logits[0].device)] if logits else None
    if at_end is not None:
        at_end._factlens_dataset = dataset.fingerprint  # metric(...) refuses them for another dataset
    return EndRun(at_end, acts, dataset_key(dataset))


__all__ = ["EndRun", "center", "dataset_key", "head_outputs", "require_eval", "reuse_run", "run_at_end",
           "unembed_params"]
