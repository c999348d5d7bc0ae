"""How the recall mechanisms emerge during training: Lv et al.'s analyses at every checkpoint of a Zucchet run.

Zucchet et al. (2025) watch knowledge appear (initial drop, plateau, emergence); Lv et al. (2024) dissect a
finished model (mover heads, a task-aware MLP intercept, a final layer that suppresses the answer).
:func:`mechanisms` runs the second on every checkpoint of the first. For each checkpoint and attribute, on
held-out templates (``"<bos> Mary Jane Smith was born in" → first token of the value``):

- **recall**: mean P(first value token) and accuracy (argmax = the value's first token);
- **path patching** (:func:`~factlens.recall.path_patching.path_patch`, metric ``iw``): the top sender heads
  into the final residual, ranked by how much replacing them lowers the answer logit (``effect``, in logits);
- **movers** (:func:`~factlens.recall.movers.mover_scores`): for the top path-patching head, the attention
  from ``end`` to the whole name span and the mover score (Pearson r × mean attention to the name's first token),
  and the largest attention to the name of any head (``name_attention_max``);
- **last MLP** (:func:`~factlens.recall.mlp_decomposition.decompose_mlp`): R² of ``mlp ≈ Σ β·head + c`` and the
  intercept's **type purity** (:func:`type_purity`): the share of its top-k vocabulary tokens that are first
  tokens of the queried attribute's values (cities for birth place...);
- **final layer** (:func:`~factlens.recall.final_layer.final_layer_split`): P(answer) before (logit lens) and after
  the last layer, and the change of the answer logit split into heads, attention biases, MLP and the final
  LayerNorm's scale;
- **logit lens** (:func:`~factlens.recall.lens.logit_lens`): P(answer) and accuracy after every layer
  (:attr:`MechanismsResult.lens`), which shows whether recall finishes before the last layer;
- **mitigations** (:func:`~factlens.testbeds.mitigations.mitigation_rows`): Lv et al.'s (a) last-layer heads attend only to ``end`` and (b) the
  last MLP's intercept subtracted at ``end``, alone and together, with the intercept fitted out of fold (k folds
  by template, as :func:`~factlens.recall.mitigation.mitigation_table` does for capitals):
  :attr:`MechanismsResult.mitigations`.

It also measures the attribute loss on held-out biographies (or reads ``metrics.jsonl``) to mark the
no-knowledge baseline, the end of the initial drop and the plateau end on the figure.

Example:
    >>> from pathlib import Path
    >>> import factlens
    >>> from factlens.testbeds.mechanisms import mechanisms
    >>> run = Path(factlens.__file__).parents[2] / "tests" / "data" / "bios_demo_run"
    >>> res = mechanisms(run, attributes=["birth_place"], n=32, progress=False)   # doctest: +SKIP
    >>> res.to_dataframe()[["step", "attribute", "prob", "type_purity"]]            # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float

from factlens.bios.data.batches import eval_batches
from factlens.bios.data.pools import ATTRIBUTES, MONTHS, attribute_index, no_knowledge_baseline
from factlens.bios.metrics import attribute_metrics
from factlens.bios.metrics_log import METRICS
from factlens.bios.phases import ratio_phases
from factlens.bios.run import Run
from factlens.errors import CheckpointError, ConfigError
from factlens.inputs import default_device
from factlens.recall.final_layer import final_layer_hooks, split_from_run
from factlens.recall.forward import center, head_outputs, run_at_end, unembed_params
from factlens.recall.lens import logit_lens, logit_lens_hooks
from factlens.recall.metrics import answer_prob, is_correct
from factlens.recall.mlp_decomposition import MLPActivations, decompose_from_activations
from factlens.recall.movers import MoverResult, pearson
from factlens.recall.path_patching import path_patch
from factlens.recall.regression import project_to_vocab
from factlens.resources import track
from factlens.testbeds.bios_recall import bios_relation_dataset
from factlens.testbeds.mechanisms_result import MechanismsResult
from factlens.testbeds.mitigations import mitigation_rows

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def type_purity(intercept: Float[torch.Tensor, " d"], W_U: Float[torch.Tensor, "d vocab"],
                value_ids: Sequence[int], k: int = 10, ln_scale: float | torch.Tensor | None = None) -> float:
    """Share of the intercept's top-k vocabulary tokens that are in ``value_ids`` (k capped at their number).

    The intercept is centred first (the final LayerNorm removes its all-ones part) and read through ``W_U``
    (pass :func:`~factlens.recall.forward.unembed_params`'s ``W_eff`` to fold in the LayerNorm weight).

    Example:
        >>> import torch
        >>> from factlens.testbeds.mechanisms import type_purity
        >>> W_U = torch.eye(6)
        >>> type_purity(W_U[:, 0] + W_U[:, 1] - W_U[:, 5], W_U, value_ids=[0, 1, 2], k=2)
        1.0
    """
    ids = sorted({int(i) for i in value_ids})
    if not ids:
        raise ConfigError("value_ids is empty; pass the token ids of the attribute's values")
    k = min(k, len(ids))
    proj = project_to_vocab(center(intercept.detach().to(W_U.dtype)), W_U, None, k=k, ln_scale=ln_scale)
    return float(np.isin(proj.top_ids.numpy(), ids).mean())


def value_first_tokens(population, vocab, attribute: str | int) -> list[int]:
    """Token ids that can start a value of ``attribute`` (the answers the recall prompts can have)."""
    a = ATTRIBUTES[attribute_index(attribute)]
    pools = population.pools
    if a == "birth_date":  # "<Month> <day>, <year>": the month starts every date
        return sorted({vocab.token_ids(month)[0] for month in MONTHS})
    return sorted({vocab.token_ids(pools.render(a, v))[0] for v in range(pools.pool_size(a))})


def _logged_losses(run: Run) -> dict[int, float]:
    """step → attribute loss from the run's ``metrics.jsonl`` evaluation records (empty when absent)."""
    if not (run.path / METRICS).exists():
        return {}
    evals = run.history.evals
    if "attr_loss" not in evals:
        return {}
    return dict(zip(evals["step"].astype(int).tolist(), evals["attr_loss"].astype(float).tolist()))


def _loss_curve(run: Run, steps: list[int], computed: list[float]) -> tuple[list[int], list[float]]:
    """The loss curve for the phases: every logged evaluation when there are more than analysed steps."""
    logged = _logged_losses(run)
    if len(logged) > len(steps):
        return sorted(logged), [logged[s] for s in sorted(logged)]
    return steps, computed


def mechanisms(run_dir: str | Path, attributes: Sequence[str | int] | None = None, steps: Sequence[int] | None = None,
               *, n: int = 128, top: int = 3, k: int = 10, n_sequences: int = 128, device: str | torch.device | None = None,
               seed: int = 0, folds: int = 5, progress: bool = True) -> MechanismsResult:
    """Run Lv et al.'s analyses on every (or each chosen) checkpoint of a biography run.

    Args:
        run_dir: A run written by ``factlens bios train`` (``config.json`` + ``checkpoints/``).
        attributes: Attribute names or indices (default: all six).
        steps: Checkpoint steps (default: all).
        n: Prompts per attribute (held-out templates; the same people at every checkpoint).
        top: Sender heads kept per (step, attribute) in :attr:`MechanismsResult.top_heads`.
        k: Top intercept tokens for the type purity.
        n_sequences: Held-out biographies for the attribute loss.
        folds: k of the out-of-fold intercepts of mitigation (b) (folds split by template).
        device: Where the models run (default: CUDA when available, else CPU).
        progress: One progress bar over the checkpoints.

    Raises:
        CheckpointError: The run has no checkpoints, or a chosen step is missing.
        ConfigError: An unknown attribute, or ``n``/``top``/``k`` below 1.
    """
    t0 = time.perf_counter()
    device = default_device(device)
    run_dir = Path(run_dir)
    run = Run(run_dir)
    run.config  # noqa: B018 - validates the run once (RunNotFoundError naming the fix when there is none)
    available = run.steps
    steps = list(available if steps is None else steps)
    missing = sorted(set(steps) - set(available))
    if missing:
        raise CheckpointError(f"{run_dir} has no checkpoint at steps {missing}; available: {available}")
    attrs = [ATTRIBUTES[attribute_index(a)] for a in (ATTRIBUTES if attributes is None else attributes)]
    if not attrs:
        raise ConfigError(f"attributes=[] selects nothing; pass some of {ATTRIBUTES} (or None for all)")
    if min(n, top, k, n_sequences) < 1:
        raise ConfigError(f"n={n}, top={top}, k={k}, n_sequences={n_sequences}; pass values >= 1")

    population, vocab = run.population(), run.vocab()
    if n > len(population):
        raise ConfigError(f"n={n} prompts per attribute, but the run has {len(population)} people (one prompt each); "
                          f"pass n <= {len(population)}.")
    datasets = {a: bios_relation_dataset(population, vocab, a, n=n, seed=seed) for a in attrs}
    counterfactuals = {a: ds.counterfactual(seed) for a, ds in datasets.items()}
    value_ids = {a: value_first_tokens(population, vocab, a) for a in attrs}
    baseline = no_knowledge_baseline(population.pools)
    logged = _logged_losses(run)
    batches = None
    values, finals, losses, head_rows, lenses, mitigation_frames = [], [], [], [], [], []
    for step in track(steps, device=device, disable=not progress, desc="checkpoints"):
        model = run.bridge(step, device)
        if step in logged:
            losses.append(logged[step])
        else:  # no metrics.jsonl record: measure the attribute loss on held-out biographies
            if batches is None:
                batches = eval_batches(population, vocab, n_sequences, 64, seq_len=model.cfg.n_ctx, seed=seed + 1234)
            with torch.no_grad():
                total = sum(float(attribute_metrics(model(b.tokens.to(device)), b).loss.mean()) * len(b)
                            for b in batches)
            losses.append(total / sum(len(b) for b in batches))
        row_v, row_f, row_l = [], [], []
        for a in attrs:
            v, f, heads, lens, mit = _analyse(model, datasets[a], counterfactuals[a], value_ids[a], top=top, k=k,
                                              folds=folds, seed=seed)
            row_v.append(v)
            row_f.append(f)
            row_l.append(lens)
            head_rows += [{"step": step, "attribute": a, **h} for h in heads]
            mitigation_frames.append(mit.assign(step=step, attribute=a))
        values.append(row_v)
        finals.append(row_f)
        lenses.append(row_l)
    import pandas as pd

    loss_steps, curve = _loss_curve(run, steps, losses)
    drop, plateau = ratio_phases(loss_steps, curve, baseline)
    return MechanismsResult(steps=steps, attributes=attrs, values=torch.tensor(values, dtype=torch.float64),
                            final_logit=torch.tensor(finals, dtype=torch.float64), top_heads=pd.DataFrame(head_rows),
                            attr_loss=torch.tensor(losses, dtype=torch.float64), loss_steps=loss_steps,
                            lens=torch.tensor(lenses, dtype=torch.float64)[..., 0],
                            lens_accuracy=torch.tensor(lenses, dtype=torch.float64)[..., 1],
                            mitigations=pd.concat(mitigation_frames, ignore_index=True)[
                                ["step", "attribute", "method", "mean_prob", "accuracy", "mean_rank", "n_prompts"]],
                            folds=folds,
                            loss_curve=curve, baseline=baseline, drop_end=drop, plateau_end=plateau,
                            run_dir=str(run_dir), n_prompts=len(next(iter(datasets.values()))), seconds=time.perf_counter() - t0)


def _analyse(model, ds, counterfactual, value_ids: list[int], *, top: int, k: int, folds: int = 5, seed: int = 0
             ) -> tuple[list[float], list[float], list[dict], list[list[float]], object]:
    """Every measurement of one checkpoint on one attribute: one shared forward pass, path patching and the
    (a) pass of the mitigations."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    last = L - 1
    names = ([f"blocks.{layer}.attn.hook_pattern" for layer in range(L)]
             + [f"blocks.{layer}.attn.hook_z" for layer in range(L)] + logit_lens_hooks(model)
             + final_layer_hooks(model))
    names = list(dict.fromkeys(names))
    run = run_at_end(model, ds, names)
    lens = logit_lens(model, ds, include_final=False, run=run)
    lens_rows = [[float(p), float(a)] for p, a in zip(lens.mean_prob, (lens.rank == 0).double().mean(1))]
    mit = mitigation_rows(model, ds, folds=folds, seed=seed, run=run)
    prob = float(answer_prob(run.logits, ds).mean())
    acc = float(is_correct(run.logits, ds).float().mean())
    # path patching: the senders whose replacement lowers the answer logit most
    pp = path_patch(model, ds, counterfactual, metric="iw", progress=False)
    effect = pp.patched_heads - pp.clean  # [L, H] logits
    order = torch.argsort(effect.reshape(-1))[:top].tolist()
    heads = [{"rank": r, "name": f"L{f // H}H{f % H}", "layer": f // H, "head": f % H,
              "effect": float(effect.reshape(-1)[f]), "pct_change": float(pp.values.reshape(-1)[f])}
             for r, f in enumerate(order)]
    tl, th = divmod(order[0], H)
    # movers (Lv et al. §4.2, as recall.movers.mover_scores) from the shared pass
    rows = torch.arange(len(ds))
    keys = ds.position("N")
    W_U_subj = model.W_U.detach()[:, ds.subject_ids.to(model.W_U.device)].T  # [n, d]
    att = run[f"blocks.{tl}.attn.hook_pattern"][rows, :, keys].cpu()  # [n, H]
    out = head_outputs(model, tl, run[f"blocks.{tl}.attn.hook_z"])  # [n, H, d]
    proj = torch.einsum("nhd,nd->nh", out, W_U_subj).cpu()  # [n, H]
    mv = MoverResult(attention=att[:, None], projection=proj[:, None], r=pearson(att, proj)[None], position="N",
                     prompts=list(ds.prompts), subjects=ds.subjects)
    span = span_attention(run, ds, L)  # [L, H]
    name_att, name_max = float(span[tl, th]), float(span.max())
    # the last MLP's decomposition and its intercept's type purity
    W_eff, _ = unembed_params(model)
    z_last = run[f"blocks.{last}.attn.hook_z"]  # [n, H, dh]
    regressors = head_outputs(model, last, z_last)  # [n, H, d]
    acts = MLPActivations(layer=last, target=run[f"blocks.{last}.hook_mlp_out"], regressors=regressors,
                          names=[f"L{last}H{h}" for h in range(H)], ln_scale=run["ln_final.hook_scale"].reshape(-1),
                          subjects=ds.subjects)
    dec = decompose_from_activations(model, acts, ds, k=k)
    purity = type_purity(dec.intercept, W_eff, value_ids, k=k)
    # the final layer
    s = split_from_run(model, ds, run).summary()
    values = [prob, acc, float(effect[tl, th]), float(pp.values[tl, th]), name_att, name_max, float(mv.score[0, th]),
              float(mv.r[0, th]), dec.r2, purity, s["prob_before"], s["prob_after"], s["delta_prob"], s["delta_logit"]]
    by = mit.set_index("method")
    values += [float(by.loc[m, "mean_prob"]) for m in ("a", "b", "a+b")]
    values += [float(by.loc[m, "accuracy"]) for m in ("a", "b", "a+b")]
    finals = [s["logit:heads"], s["logit:attn_bias"], s[f"logit:MLP{last}"], s["logit:ln_scale"]]
    return values, finals, heads, lens_rows, mit.drop(columns=["prob", "fold"])


def name_attention(model: TransformerBridge, dataset, *, interventions=None, max_batch: int = 64) -> Float[torch.Tensor, "layer head"]:
    """``[layer, head]`` mean attention from ``end`` to the subject's span ``N``..``N_last`` (the whole name).

    Example:
        >>> import factlens
        >>> from factlens.recall.datasets import make_prompt_dataset
        >>> from factlens.tokenizers import gpt2_tokenizer
        >>> from factlens.testbeds.mechanisms import name_attention
        >>> ds = make_prompt_dataset([("Ada Lovelace was born in", "Ada Lovelace", "London")], gpt2_tokenizer())
        >>> name_attention(factlens.tiny("gpt2"), ds).shape
        torch.Size([2, 4])
    """
    L = model.cfg.n_layers
    run = run_at_end(model, dataset, [f"blocks.{layer}.attn.hook_pattern" for layer in range(L)], logits=False,
                     interventions=interventions, max_batch=max_batch)
    return span_attention(run, dataset, L)


def span_attention(run, dataset, n_layers: int) -> Float[torch.Tensor, "layer head"]:
    """``[layer, head]`` mean attention to the name span from the ``hook_pattern`` rows of an ``EndRun``."""
    keys = torch.arange(dataset.tokens.shape[1])
    span = ((keys[None] >= dataset.positions["N"][:, None])
            & (keys[None] <= dataset.positions["N_last"][:, None])).float()  # [n, width]
    return torch.stack([(run[f"blocks.{layer}.attn.hook_pattern"].cpu() * span[:, None]).sum(-1).mean(0)
                        for layer in range(n_layers)])  # [L, H]


__all__ = ["mechanisms", "name_attention", "span_attention", "type_purity", "value_first_tokens"]
