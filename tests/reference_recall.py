"""Slow, literal twins of the fast factlens.recall paths, kept as the ground truth the tests compare against.

- :func:`path_patch_reference`: Lv et al.'s path patching as the official four passes, one sender at a time,
  with full-sequence forward passes (two per sender), against :func:`factlens.recall.path_patch`.
- :func:`mitigation_reference`: every method and fold of the mitigation table with its own hooked forward pass
  (:func:`factlens.recall.evaluate`), against :func:`factlens.recall.mitigation_table`'s two passes.
- :func:`tl_sweep`: the same path patching through TransformerLens's own ``generic_activation_patch`` (one
  full forward pass per (layer, head) and per MLP, q/k/v frozen by persistent hooks).
- :func:`analyze_unshared`: every step of :func:`factlens.recall.analyze` run on its own passes, against the
  one shared clean pass.
"""

from __future__ import annotations

import pandas as pd
import torch
from transformer_lens import patching

from factlens.cache import run_with_cache
from factlens.hooks import Intervention, hook
from factlens.intervening import intervene
from factlens.recall import (
    dataset_for,
    evaluate,
    final_layer_effect,
    logit_lens,
    metric,
    mover_scores,
    path_patch,
    run_at_end,
    template_folds,
)
from factlens.recall.datasets import RelationDataset
from factlens.recall.forward import require_eval
from factlens.recall.metrics import end_logits
from factlens.recall.mitigation import _fit_from_acts
from factlens.recall.mlp_decomposition import capture_mlp_activations
from factlens.recall.path_patching import MetricSpec, _metric_fn, _result, _senders
from factlens.recall.relations import CAPITALS


def path_patch_reference(model, dataset: RelationDataset, counterfactual: RelationDataset | None = None, *,
                         metric: MetricSpec = "iw", freeze_mlps: bool = False, seed: int = 0):
    """The official four-pass procedure, one sender at a time (same arguments and result as ``path_patch``)."""
    require_eval(model, "path patching")
    counterfactual = dataset.counterfactual(seed) if counterfactual is None else counterfactual
    metric_fn, metric_name = _metric_fn(metric, dataset)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    device = model.cfg.device
    tokens = dataset.tokens.to(device)
    ends = dataset.end.to(device)
    rows = torch.arange(len(dataset), device=device)
    receiver = f"blocks.{L - 1}.hook_resid_post"

    with torch.no_grad():
        # pass A: D_new means at each D_new prompt's end
        want_new = [f"blocks.{layer}.{n}" for layer in range(L) for n in ("attn.hook_z", "hook_mlp_out")]
        _, cache_new = run_with_cache(model, counterfactual.tokens.to(device), names_filter=want_new)
        r_new, e_new = torch.arange(len(counterfactual), device=device), counterfactual.end.to(device)
        z_mean = {layer: cache_new[f"blocks.{layer}.attn.hook_z"][r_new, e_new].mean(0) for layer in range(L)}
        mlp_mean = {layer: cache_new[f"blocks.{layer}.hook_mlp_out"][r_new, e_new].mean(0) for layer in range(L)}
        del cache_new
        # pass B: clean cache
        want = [f"blocks.{layer}.attn.hook_{act}" for layer in range(L) for act in "qkv"]
        want += [f"blocks.{layer}.hook_mlp_out" for layer in range(L)] if freeze_mlps else []
        clean_logits, cache = run_with_cache(model, tokens, names_filter=want)
        clean_metric = metric_fn(end_logits(clean_logits, dataset))

    def frozen(name):
        return lambda t, hook: cache[name].to(t.dtype)

    freeze = Intervention("freeze q/k/v (and MLPs)")
    for layer in range(L):
        for act in ("q", "k", "v"):
            name = f"blocks.{layer}.attn.hook_{act}"
            freeze.add(name, frozen(name), copy_input=False)
        if freeze_mlps:
            name = f"blocks.{layer}.hook_mlp_out"
            freeze.add(name, frozen(name), copy_input=False)

    values = []
    for kind, layer, head in _senders(L, H):
        if kind == "head":
            def set_sender(t, hook, layer=layer, head=head):  # hook_z [b, p, H, dh]
                out = t.clone()
                out[rows, ends, head] = z_mean[layer][head].to(t.dtype)
                return out

            sender = hook(f"blocks.{layer}.attn.hook_z", set_sender, f"sender L{layer}H{head}")
        else:
            def set_sender(t, hook, layer=layer):  # hook_mlp_out [b, p, d]
                out = t.clone()
                out[rows, ends] = mlp_mean[layer].to(t.dtype)
                return out

            sender = hook(f"blocks.{layer}.hook_mlp_out", set_sender, f"sender MLP{layer}")
        store = {}

        def keep(t, hook, store=store):
            store["r"] = t[rows, ends].clone()

        # pass C: frozen heads, sender replaced at end; cache the receiver at end
        with torch.no_grad(), intervene(model, freeze, on_no_effect="ignore"), intervene(model, sender), \
                intervene(model, hook(receiver, keep), on_no_effect="ignore"):
            model(tokens, return_type=None)

        # pass D: clean run with the receiver at end overwritten
        def set_receiver(t, hook, store=store):
            out = t.clone()
            out[rows, ends] = store["r"]
            return out

        with torch.no_grad(), intervene(model, hook(receiver, set_receiver), on_no_effect="ignore"):
            patched_logits = model(tokens)
        values.append(metric_fn(end_logits(patched_logits, dataset)))
    return _result(values, clean_metric, L, H, metric=metric_name, receiver=receiver, freeze_mlps=freeze_mlps,
                   n_prompts=len(dataset), n_counterfactual=len(counterfactual), method="reference")


def tl_sweep(model, ds, cf, progress: bool):
    """Path patching through TL's generic_activation_patch (heads, then MLPs)."""
    L = model.cfg.n_layers
    device = model.cfg.device
    tokens = ds.tokens.to(device)
    rows, ends = torch.arange(len(ds), device=device), ds.end.to(device)
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(L)] + [f"blocks.{layer}.hook_mlp_out" for layer in range(L)]
    means = run_at_end(model, cf, names, logits=False)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_q", "hook_k", "hook_v")))
    # a "clean cache" for TL holding the counterfactual mean at every prompt's end position
    source = {}
    for name in names:
        shape = (len(ds), tokens.shape[1], *means[name].shape[1:])
        t = torch.zeros(shape, device=device)
        t[rows, ends] = means[name].mean(0)
        source[name] = t

    def head_setter(act, index, src):  # act [b, p, H, dh]; index [layer, head]
        act[rows, ends, index[1]] = src[rows, ends, index[1]]
        return act

    def mlp_setter(act, index, src):  # act [b, p, d]; index [layer]
        act[rows, ends] = src[rows, ends]
        return act

    def frozen(name):
        return lambda t, hook: clean_cache[name]

    freeze = [(f"blocks.{layer}.attn.hook_{a}", frozen(f"blocks.{layer}.attn.hook_{a}"))
              for layer in range(L) for a in ("q", "k", "v")]
    fn = metric(ds, "iw")
    with torch.no_grad(), model.hooks(fwd_hooks=freeze):
        heads = patching.generic_activation_patch(model, tokens, source, fn, head_setter, "z",
                                                  index_axis_names=["layer", "head"])
        mlps = patching.generic_activation_patch(model, tokens, source, fn, mlp_setter, "mlp_out",
                                                 index_axis_names=["layer"])
    return heads.double().cpu(), mlps.double().cpu()


def mitigation_reference(model, relation=CAPITALS, shots: int = 0, folds: int = 5, heads=None, coeff: float = 1.0,
                         *, pooled: bool = True, seed: int = 0, n: int | None = None, ridge: float = 0.0,
                         max_batch: int = 64):
    """One setting of the mitigation table with one hooked forward pass per method and fold.

    Returns ``(per-method per-prompt frames, {fold: intercept})`` in the layout of ``mitigation_table``.
    """
    ds = dataset_for(model, relation, shots=shots, seed=seed, n=n)
    acts = capture_mlp_activations(model, ds, -1, max_batch=max_batch)
    results = {"baseline": evaluate(model, ds, max_batch=max_batch),
               "a": evaluate(model, ds, attention=True, heads=heads, max_batch=max_batch)}
    for m in ("baseline", "a"):
        results[m]["fold"] = -1
    intercepts, parts = {}, {"b": [], "a+b": []}
    for f, (fit_idx, eval_idx) in enumerate(template_folds(ds, folds, seed)):
        c = _fit_from_acts(acts.select(fit_idx), pooled, ridge)
        intercepts[f] = c
        eval_ds = ds.select(eval_idx)
        for m, attn in (("b", False), ("a+b", True)):
            df = evaluate(model, eval_ds, attention=attn, intercept=c, heads=heads, coeff=coeff, max_batch=max_batch)
            df.index = eval_idx
            df["fold"] = f
            parts[m].append(df)
    for m in ("b", "a+b"):
        results[m] = pd.concat(parts[m]).sort_index()
    return results, intercepts


def analyze_unshared(model, ds: RelationDataset, *, seed: int = 0, patch_batch: int = 1024):
    """``analyze``'s steps, each on its own forward passes (no shared run): lens, path patching, movers,
    final-layer effect, and the last MLP's activations."""
    return {"lens": logit_lens(model, ds),
            "path_patching": path_patch(model, ds, metric="iw", max_batch=patch_batch, seed=seed, progress=False),
            "movers": mover_scores(model, ds),
            "final_layer": final_layer_effect(model, ds),
            "acts": {layer: capture_mlp_activations(model, ds, layer) for layer in range(model.cfg.n_layers)}}
