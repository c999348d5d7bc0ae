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

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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
from factlens.storage import atomic_write
from factlens.testbeds.bios_recall import bios_relation_dataset
from factlens.testbeds.mitigations import MITIGATIONS, mitigation_rows

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

#: Per (step, attribute) measurements, in :attr:`MechanismsResult.values` order.
MEASURES = ("prob", "accuracy", "top_head_effect", "top_head_pct", "name_attention", "name_attention_max",
            "mover_score", "mover_r",
            "mlp_r2", "type_purity", "prob_before", "prob_after", "delta_prob", "delta_logit",
            "prob_a", "prob_b", "prob_ab", "accuracy_a", "accuracy_b", "accuracy_ab")

#: Parts of the final layer's change of the answer logit, in :attr:`MechanismsResult.final_logit` order.
FINAL_PARTS = ("heads", "attn_bias", "mlp", "ln_scale")


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


@dataclass
class MechanismsResult:
    """Lv et al.'s measurements at each checkpoint of a biography run, per attribute.

    Attributes:
        steps: Checkpoint steps; attributes: attribute names.
        values: ``[step, attribute, measure]`` (see :data:`MEASURES`); axes :attr:`axis_names`.
        final_logit: ``[step, attribute, part]`` mean change of the answer logit across the last layer, split
            into :data:`FINAL_PARTS` (they add up to ``delta_logit``).
        top_heads: One row per (step, attribute, rank): the top path-patching sender heads and their effect.
        attr_loss: ``[step]`` attribute loss (nats, mean over the 6 attributes) on held-out biographies.
        lens / lens_accuracy: ``[step, attribute, layer]`` mean P(answer) and accuracy read by the logit lens
            after each layer (the last layer's equals the model's own).
        mitigations: One row per (step, attribute, method in :data:`MITIGATIONS`): mean_prob, accuracy,
            mean_rank, n_prompts (see :func:`~factlens.testbeds.mitigations.mitigation_rows`); folds: the k of its out-of-fold intercepts.
        loss_steps / loss_curve: The loss curve used for the phases (``metrics.jsonl`` when present, else
            ``attr_loss``); baseline: the no-knowledge attribute loss (nats); drop_end / plateau_end: steps.
    """

    steps: list[int]
    attributes: list[str]
    values: Float[torch.Tensor, "step attribute measure"]
    final_logit: Float[torch.Tensor, "step attribute part"]
    top_heads: object  # pandas.DataFrame
    attr_loss: Float[torch.Tensor, " step"]
    loss_steps: list[int]
    loss_curve: list[float]
    baseline: float
    drop_end: int | None
    plateau_end: int | None
    lens: Float[torch.Tensor, "step attribute layer"] | None = None
    lens_accuracy: Float[torch.Tensor, "step attribute layer"] | None = None
    mitigations: object = None  # pandas.DataFrame, one row per (step, attribute, method)
    folds: int = 5
    run_dir: str = ""
    n_prompts: int = 0
    seconds: float = float("nan")
    measures: tuple[str, ...] = MEASURES
    parts: tuple[str, ...] = FINAL_PARTS
    axis_names: tuple[str, ...] = field(default=("step", "attribute", "measure"))

    def measure(self, name: str) -> Float[torch.Tensor, "step attribute"]:
        """``[step, attribute]`` values of one measure."""
        if name not in self.measures:
            raise ConfigError(f"unknown measure {name!r}; pick one of {self.measures}")
        return self.values[:, :, self.measures.index(name)]

    def suppression_from(self, attribute: str | None = None, tol: float = 0.0) -> int | None:
        """First step from which the last layer lowers mean P(answer) (``delta_prob < −tol``) at every later
        checkpoint, for one attribute (default: the mean over attributes); None if it does not at the end."""
        delta = self.measure("delta_prob")
        d = delta.mean(1) if attribute is None else delta[:, self._attr(attribute)]
        start = None
        for i in range(len(self.steps) - 1, -1, -1):
            if float(d[i]) < -tol:
                start = self.steps[i]
            else:
                break
        return start

    def _attr(self, attribute: str) -> int:
        if attribute not in self.attributes:
            raise ConfigError(f"attribute {attribute!r} was not analysed; pick one of {self.attributes}")
        return self.attributes.index(attribute)

    def phases(self) -> list[tuple[str, int, int]]:
        """``(name, start step, end step)`` of the phases that the loss curve shows."""
        lo, hi = self.loss_steps[0], self.loss_steps[-1]
        out = []
        if self.drop_end is not None:
            out.append(("1 initial drop", lo, self.drop_end))
            out.append(("2 plateau", self.drop_end, self.plateau_end if self.plateau_end is not None else hi))
        if self.plateau_end is not None:
            out.append(("3 knowledge", self.plateau_end, hi))
        return out

    def mitigation_table(self, step: int | None = None):
        """Mean P(answer) and accuracy per attribute and method at one checkpoint (default: the last), wide.

        Example:
            >>> from factlens.testbeds.mechanisms import mechanisms
            >>> res = mechanisms("runs/demo")    # doctest: +SKIP
            >>> res.mitigation_table()            # doctest: +SKIP
        """
        if self.mitigations is None or len(self.mitigations) == 0:
            raise ConfigError("this result has no mitigation rows; run mechanisms(...) to compute them")
        step = self.steps[-1] if step is None else step
        if step not in self.steps:
            raise ConfigError(f"step {step} was not analysed; pick one of {self.steps}")
        sel = self.mitigations[self.mitigations["step"] == step]
        return sel.pivot(index="attribute", columns="method", values=["mean_prob", "accuracy"])[
            [(v, m) for v in ("mean_prob", "accuracy") for m in MITIGATIONS]]

    def to_dataframe(self):
        """One row per (step, attribute): every measure, the final-layer parts (``final_<part>``) and the
        attribute loss of that checkpoint."""
        import pandas as pd

        rows = []
        for i, step in enumerate(self.steps):
            for j, attr in enumerate(self.attributes):
                row = {"step": step, "attribute": attr, "attr_loss": float(self.attr_loss[i])}
                row.update({m: float(v) for m, v in zip(self.measures, self.values[i, j].tolist())})
                row.update({f"final_{p}": float(v) for p, v in zip(self.parts, self.final_logit[i, j].tolist())})
                rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        last = self.values[-1].mean(0)
        get = dict(zip(self.measures, last.tolist()))
        sup = self.suppression_from()
        return (f"MechanismsResult({len(self.steps)} checkpoints {self.steps[0]}..{self.steps[-1]}, "
                f"{len(self.attributes)} attributes, {self.n_prompts} prompts each; last: P={get['prob']:.3f}, "
                f"acc={get['accuracy']:.3f}, name attention={get['name_attention']:.3f}, "
                f"type purity={get['type_purity']:.2f}, final-layer ΔP={get['delta_prob']:+.4f}; plateau end "
                f"{self.plateau_end}; suppression from {sup})")

    def plot(self, title: str | None = None):
        """All measurements on the training-step axis, with the baseline, the phases and the plateau end."""
        return plot_mechanisms(self, title)


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


def check_out(out: str | Path) -> Path:
    """The output folder, refused (ConfigError) when it is an existing file."""
    from factlens.storage import check_writable_dir

    return check_writable_dir(out, "pass a writable folder as --out (the run folder may be read-only)")


def write_mechanisms(result: MechanismsResult, out: str | Path, *, png: bool = True) -> list[Path]:
    """Write ``mechanisms.csv``, ``top_heads.csv``, ``mitigations.csv``, ``logit_lens.csv``, ``mechanisms.html``
    and (with kaleido + Chrome installed) ``mechanisms.png`` to ``out``, each atomically; returns the paths written.

    Example:
        >>> from factlens.testbeds.mechanisms import write_mechanisms
        >>> from factlens.testbeds.mechanisms import mechanisms
        >>> result = mechanisms("runs/demo")                                    # doctest: +SKIP
        >>> write_mechanisms(result, "runs/demo/mechanisms")                    # doctest: +SKIP
    """
    out = check_out(out)
    fig = result.plot()  # build everything before writing anything
    files = {"mechanisms.csv": result.to_dataframe().to_csv(index=False).encode(),
             "top_heads.csv": result.top_heads.to_csv(index=False).encode(),
             "mechanisms.html": fig.to_html().encode()}
    if result.mitigations is not None and len(result.mitigations):
        files["mitigations.csv"] = result.mitigations.to_csv(index=False).encode()
    if result.lens is not None:
        import pandas as pd

        lens = pd.DataFrame([{"step": step, "attribute": attr, "layer": layer,
                              "prob": float(result.lens[i, j, layer]), "accuracy": float(result.lens_accuracy[i, j, layer])}
                             for i, step in enumerate(result.steps) for j, attr in enumerate(result.attributes)
                             for layer in range(result.lens.shape[2])])
        files["logit_lens.csv"] = lens.to_csv(index=False).encode()
    if png:
        with contextlib.suppress(Exception):  # kaleido/Chrome not installed: the HTML is the figure
            files["mechanisms.png"] = fig.to_image(format="png", scale=1)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write(out / name, data)
    return [out / name for name in files]


_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
_LAYER_COLOURS = ("#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b")
_METHOD_COLOURS = {"baseline": "black", "a": "#1f77b4", "b": "#ff7f0e", "a+b": "#2ca02c"}
_PART_COLOURS = {"heads": "#1f77b4", "attn_bias": "#7f7f7f", "mlp": "#2ca02c", "ln_scale": "#d62728"}


def plot_mechanisms(res: MechanismsResult, title: str | None = None):
    """The figure of :meth:`MechanismsResult.plot` (one row per mechanism, a shared training-step axis)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = [("Attribute loss (nats)", None), ("Recall: P(first value token) — solid, accuracy — dotted", None),
            ("Path patching: top head's effect on the answer logit (logits)", None),
            ("Attention to the name: top head — solid, best head — dash; top head's mover score — dotted", None),
            ("Last MLP: R² — solid; intercept type purity — dotted", None),
            ("Final layer: ΔP(answer) across the last layer", None),
            ("Final layer: Δ answer logit by part (mean over attributes)", None)]
    extra = []
    if res.lens is not None:
        extra.append("Logit lens: P(answer) after each layer (mean over attributes)")
    if res.mitigations is not None and len(res.mitigations):
        extra.append(f"Mitigations: mean P(answer) — solid, accuracy — dotted ({res.folds}-fold intercepts)")
    rows += [(t, None) for t in extra]
    fig = make_subplots(rows=len(rows), cols=1, shared_xaxes=True, vertical_spacing=0.035,
                        subplot_titles=[r[0] for r in rows])
    x = res.steps
    fig.add_trace(go.Scatter(x=res.loss_steps, y=res.loss_curve, mode="lines+markers", name="attribute loss",
                             line={"color": "black"},
                             hovertemplate="step %{x}<br>attribute loss %{y:.3f} nats<extra></extra>"), 1, 1)
    fig.add_trace(go.Scatter(x=[min(res.loss_steps + x), max(res.loss_steps + x)], y=[res.baseline] * 2, mode="lines",
                             name=f"no-knowledge baseline ({res.baseline:.3f} nats)",
                             line={"color": "grey", "dash": "dash"}), 1, 1)
    fig.add_hline(y=res.baseline, line={"color": "grey", "dash": "dash"}, row=1, col=1)  # visible at one checkpoint
    pairs = [(2, "prob", "accuracy", None), (3, "top_head_effect", None, None),
             (4, "name_attention", "mover_score", "name_attention_max"), (5, "mlp_r2", "type_purity", None),
             (6, "delta_prob", None, None)]
    for j, attr in enumerate(res.attributes):
        colour = _COLOURS[j % len(_COLOURS)]
        for row, solid, dotted, dashed in pairs:
            for name, dash in ((solid, "solid"), (dotted, "dot"), (dashed, "dash")):
                if name is None:
                    continue
                fig.add_trace(go.Scatter(
                    x=x, y=res.measure(name)[:, j].tolist(), mode="lines+markers", name=attr, legendgroup=attr,
                    showlegend=row == 2 and dash == "solid", line={"color": colour, "dash": dash},
                    hovertemplate=f"{attr}<br>step %{{x}}<br>{name} %{{y:.4g}}<extra></extra>"), row, 1)
    mean_parts = res.final_logit.mean(1)  # [step, part]
    for p, part in enumerate(res.parts):
        fig.add_trace(go.Scatter(x=x, y=mean_parts[:, p].tolist(), mode="lines+markers", name=f"Δ logit: {part}",
                                 line={"color": _PART_COLOURS[part]},
                                 hovertemplate=f"{part}<br>step %{{x}}<br>%{{y:+.4f}} logits<extra></extra>"), 7, 1)
    fig.add_hline(y=0, line={"color": "grey", "width": 1}, row=6, col=1)
    fig.add_hline(y=0, line={"color": "grey", "width": 1}, row=7, col=1)
    row = 8
    if res.lens is not None:
        lens = res.lens.mean(1)  # [step, layer]
        for layer in range(lens.shape[1]):
            fig.add_trace(go.Scatter(x=x, y=lens[:, layer].tolist(), mode="lines+markers", name=f"after layer {layer}",
                                     line={"color": _LAYER_COLOURS[layer % len(_LAYER_COLOURS)]},
                                     hovertemplate=f"after layer {layer}<br>step %{{x}}<br>P %{{y:.4f}}<extra></extra>"),
                          row, 1)
        row += 1
    if res.mitigations is not None and len(res.mitigations):
        mean = res.mitigations.groupby(["step", "method"])[["mean_prob", "accuracy"]].mean()
        for m in MITIGATIONS:
            sub = mean.xs(m, level="method").reindex(x)
            for col, dash in (("mean_prob", "solid"), ("accuracy", "dot")):
                fig.add_trace(go.Scatter(x=x, y=sub[col].tolist(), mode="lines+markers", name=f"mitigation {m}",
                                         legendgroup=f"mitigation {m}", showlegend=dash == "solid",
                                         line={"color": _METHOD_COLOURS[m], "dash": dash},
                                         hovertemplate=f"{m}<br>step %{{x}}<br>{col} %{{y:.4f}}<extra></extra>"),
                              row, 1)
    shades = {"1 initial drop": "rgba(255,127,14,0.10)", "2 plateau": "rgba(127,127,127,0.13)",
              "3 knowledge": "rgba(44,160,44,0.10)"}
    for name, lo, hi in res.phases():
        fig.add_vrect(x0=lo, x1=hi, fillcolor=shades[name], line_width=0, layer="below", row="all", col=1)
        fig.add_annotation(x=(lo + hi) / 2, y=0.98, xref="x", yref="y domain", yanchor="top", text=f"phase {name}",
                           showarrow=False, font={"size": 10})
    if res.plateau_end is not None:
        fig.add_vline(x=res.plateau_end, line={"color": "green", "dash": "dash"}, row="all", col=1)
    sup = res.suppression_from()
    if sup is not None:
        fig.add_vline(x=sup, line={"color": "red", "dash": "dot"}, row=6, col=1)
    y_titles = ["nats", "P / accuracy", "Δ iw (logits)", "attention / score", "R² / purity", "Δ P", "Δ logit",
                *(["P(answer)"] if res.lens is not None else []),
                *(["P / accuracy"] if res.mitigations is not None and len(res.mitigations) else [])]
    for i, t in enumerate(y_titles, start=1):
        fig.update_yaxes(title_text=t, row=i, col=1)
    fig.update_xaxes(title_text="training step", row=len(rows), col=1)
    phase_note = (f"plateau end {res.plateau_end}" if res.plateau_end is not None
                  else "plateau end not visible" + (" (one checkpoint)" if len(x) < 2 else ""))
    fig.update_layout(
        title=title or (f"Recall mechanisms over training — {Path(res.run_dir).name or 'run'} ({phase_note}; "
                        f"final-layer suppression from {sup if sup is not None else '—'})"),
        template="plotly_white", height=1700 + 240 * len(extra), width=1000, legend={"tracegroupgap": 4})
    return fig


__all__ = ["FINAL_PARTS", "MEASURES", "MechanismsResult", "mechanisms", "name_attention", "plot_mechanisms",
           "span_attention", "type_purity", "value_first_tokens", "write_mechanisms"]
