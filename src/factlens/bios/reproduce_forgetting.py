"""Zucchet et al.'s §4 in one resumable command: hallucinations, fine-tuning and forgetting, replay, the toy model.

:func:`reproduce_forgetting` runs up to three stages under ``out_dir`` and writes ``forgetting_report.html`` and
``forgetting_summary.json``:

- ``hallucination``: a pre-training run (``hallucination/base``) that evaluates people it never saw at every
  checkpoint; seen (held-out templates) against unseen people's attribute loss, accuracy, top-token probability
  and entropy on the plateau and at the end.
- ``finetune``: fine-tuning runs from that run's last checkpoint (``finetune/new{K}_w{W}``): without replay for
  several new-population sizes, and with several replay weights for one size; old-people accuracy early and
  at the end, new-people accuracy and the step it reaches 0.5; per-layer attention drift on the largest
  no-replay run. With the scale's ``rare`` setting, also the paper's Fig. P: a celebrity pre-training run
  (``rare/base``) fine-tuned on its own rare, already-seen people, the non-celebrities (``rare/finetune``).
- ``toy``: the toy associative memory (:mod:`factlens.bios.toy_memory`) in ``toy/``.

Every cell is a run directory (or the toy's saved result); a finished cell is read, not recomputed, so an
interrupted call resumes where it stopped (a run directory refuses another config). The training cells run
through :func:`~factlens.bios.executor.run_cells` (here, or as SLURM job arrays): the pre-training run first,
then the fine-tuning cells built from its last checkpoint; a failing cell is reported and the others go on.

Example:
    >>> from factlens.bios.reproduce_forgetting import reproduce_forgetting
    >>> result = reproduce_forgetting("tiny", "runs/forgetting-tiny", progress=False)   # doctest: +SKIP
    >>> result.finetune                                                                   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from factlens.bios.attention_drift import AttentionDrift, attention_drift
from factlens.bios.cells import Cell
from factlens.bios.config import TrainConfig
from factlens.bios.executor import CellsReport, ExecutorConfig, run_cells
from factlens.bios.finetune import finetune_config
from factlens.bios.forgetting import forgetting_summary
from factlens.bios.history import TrainingHistory
from factlens.bios.toy_memory import ToyMemoryConfig, ToyMemoryResult, run_toy_memory
from factlens.display import ResultDisplay
from factlens.errors import CheckpointError, ConfigError
from factlens.storage import atomic_write

STAGES = ("hallucination", "finetune", "toy")
PAPER_HALLUCINATION = {  # Zucchet et al. Fig M (N = 64k, 16k held-out people)
    ("plateau", "unseen", "top_prob"): 0.53, ("plateau", "unseen", "entropy"): 1.95,
    ("end", "unseen", "attr_loss"): 16.0, ("end", "unseen", "attr_acc"): 0.0, ("end", "unseen", "top_prob"): 0.79,
    ("end", "unseen", "entropy"): 0.74, ("end", "seen", "attr_loss"): 0.016, ("end", "seen", "attr_acc"): 1.0,
    ("end", "seen", "top_prob"): 0.997, ("end", "seen", "entropy"): 0.03}


@dataclass(frozen=True)
class ForgettingScale:
    """What one scale of the §4 reproduction trains.

    Attributes:
        preset / overrides: the pre-training run (:class:`TrainConfig` preset; it must evaluate unseen people).
        new_sizes: new-population sizes fine-tuned on without replay.
        replay_new / replay_weights: the new-population size and the replay weights of the replay cells.
        steps / lr: fine-tuning steps and constant learning rate. checkpoint_every: fine-tuning evaluation
            interval (``None``: the paper's schedule). drift_sequences: old biographies for attention drift.
        toy: the :class:`ToyMemoryConfig` preset of the toy stage.
        rare: ``(fraction of N that are celebrities, their weight)`` of the Fig. P pre-training run, fine-tuned on
            its non-celebrities; ``None``: no such cells.
        keep_optimizer: ``(new people, replay weight)`` cells trained a second time with the pre-training run's
            AdamW state carried over (``finetune/newK_wW_keep``); the other cells start AdamW afresh.
    """

    preset: str
    overrides: dict
    new_sizes: tuple[int, ...]
    replay_new: int
    replay_weights: tuple[float, ...]
    steps: int
    lr: float
    checkpoint_every: int | None
    drift_sequences: int
    toy: str
    rare: tuple[float, float] | None = None
    keep_optimizer: tuple[tuple[int, float], ...] = ()

    def base_config(self) -> TrainConfig:
        config = TrainConfig.preset(self.preset, **self.overrides)
        if not config.n_unseen:
            raise ConfigError("the hallucination stage needs unseen people: set n_unseen in the scale's overrides.")
        return config

    def rare_config(self) -> TrainConfig:
        """The Fig. P pre-training run: the base run's config with the celebrity sampler of ``rare``."""
        if self.rare is None:
            raise ConfigError("this scale has no rare setting; pass rare=(celebrity fraction, weight).")
        n = self.base_config().n_people
        sampler = {"kind": "celebrities", "n_celebrities": max(1, round(self.rare[0] * n)), "weight": self.rare[1]}
        return TrainConfig.preset(self.preset, **{**self.overrides, "sampler": sampler})

    def cells(self) -> list[tuple[int, float]]:
        """``(new people, replay weight)`` of every fine-tuning cell with a fresh AdamW (no replay first)."""
        cells = [(k, 0.0) for k in self.new_sizes] + [(self.replay_new, w) for w in self.replay_weights]
        return list(dict.fromkeys(cells))

    def all_cells(self) -> list[tuple[int, float, bool]]:
        """``(new people, replay weight, keep_optimizer)`` of every fine-tuning cell: :meth:`cells`, then
        ``keep_optimizer``'s."""
        return [(k, w, False) for k, w in self.cells()] + [(k, w, True) for k, w in dict.fromkeys(self.keep_optimizer)]


# cpu: the demo model and recipe (2 layers, batch 32, AdamW (0.9, 0.995), LR 2e-3 cosine to 4e-4, small pools)
# on 325 people for 900 steps (accuracy 0.90 at the end; docs/reproduction.md §4), evaluating 192
# unseen people; fine-tuning for a sixth of that at a constant LR of a quarter of the peak (the paper: 4k steps
# after 16k, LR 3e-5 after a 4e-4 peak), on 1/16 to 1/2 as many new people as old ones (the paper: 1/64 to 1/4),
# replay with 20 new people (1/16, as the paper's 4k of 64k); Fig. P with the paper's 1/16 of the people as
# celebrities of weight 8; three cells again with the pre-training AdamW state.
FORGETTING_SCALES: dict[str, ForgettingScale] = {
    "tiny": ForgettingScale(preset="tiny", overrides=dict(steps=30, n_unseen=16, checkpoint_every=10),
                            new_sizes=(4, 16), replay_new=4, replay_weights=(1.0, 0.25), steps=10, lr=1e-3,
                            checkpoint_every=5, drift_sequences=8, toy="tiny", rare=(0.25, 4),
                            keep_optimizer=((4, 0.0),)),
    "cpu": ForgettingScale(preset="demo", overrides=dict(n_people=325, steps=900, n_unseen=192),
                           new_sizes=(20, 40, 80, 160), replay_new=20, replay_weights=(1.0, 0.25, 1 / 16, 1 / 32),
                           steps=150, lr=5e-4, checkpoint_every=10, drift_sequences=64, toy="paper",
                           rare=(1 / 16, 8), keep_optimizer=((20, 0.0), (160, 0.0), (20, 1.0))),
    "gpu": ForgettingScale(preset="paper", overrides=dict(n_unseen=16_000), new_sizes=(1000, 2000, 4000, 8000, 16_000),
                           replay_new=4000, replay_weights=(2.0, 1.0, 0.5, 0.25, 0.125, 1 / 16, 1 / 32), steps=4000,
                           lr=3e-5, checkpoint_every=None, drift_sequences=256, toy="paper", rare=(1 / 16, 8),
                           keep_optimizer=((4000, 0.0), (16_000, 0.0), (4000, 1.0))),
}


@dataclass
class ForgettingResult(ResultDisplay):
    """Tables of the §4 stages and where the report is.

    Attributes:
        hallucination: rows ``phase`` (plateau / end) × ``people`` (seen / unseen), columns ``step, attr_loss,
            attr_acc, top_prob, entropy`` and the paper's numbers where it gives them (``paper_*``).
        finetune: one row per fine-tuning cell: ``new_people``, ``new_fraction`` (of the old population),
            ``replay_weight``, ``optimizer`` (``fresh`` AdamW, or the ``pre-training`` run's state) and
            :func:`~factlens.bios.forgetting.forgetting_summary`'s numbers.
        rare: Fig. P, one row: the celebrity run's ``celebrities`` and ``non_celebrities`` counts and
            :func:`~factlens.bios.forgetting.forgetting_summary` of fine-tuning on the non-celebrities (``old_*``:
            the celebrities, ``new_*``: the non-celebrities, already seen in pre-training).
        drift: attention drift of the largest no-replay cell (or ``None``). toy: the toy model's result.
        trained: cells computed by this call. missing: cells not finished (``train_missing=False``, queued on
            SLURM, or failed). cells: every training cell's status (failed ones with their error).
    """

    scale: str
    hallucination: pd.DataFrame | None = None
    finetune: pd.DataFrame | None = None
    rare: pd.DataFrame | None = None
    drift: AttentionDrift | None = None
    toy: ToyMemoryResult | None = None
    histories: dict = field(default_factory=dict, repr=False)
    report: Path | None = None
    trained: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    cells: CellsReport = field(default_factory=lambda: CellsReport([]), repr=False)

    def to_dataframe(self) -> pd.DataFrame:
        """The fine-tuning table (the headline)."""
        return pd.DataFrame() if self.finetune is None else self.finetune.copy()

    def figures(self) -> dict:
        """``{name: plotly Figure}`` of the report."""
        return _figures(self)

    def plot(self):
        """Old and new people's accuracy during fine-tuning, every cell."""
        return self.figures()["forgetting"]


def forgetting_cells(sc: ForgettingScale, out: str | Path, stage: str) -> list[Cell]:
    """The training cells of a stage: ``hallucination`` (the pre-training run ``hallucination/base``),
    ``finetune`` (``finetune/new{K}_w{W}``, built from the base run's last checkpoint: it must be finished; with
    ``_keep`` the pre-training AdamW state is carried over),
    ``rare`` (the celebrity pre-training run ``rare/base``) or ``rare_finetune`` (``rare/finetune``: its
    non-celebrities, from its last checkpoint, without replay).

    Example:
        >>> from factlens.bios.reproduce_forgetting import FORGETTING_SCALES, forgetting_cells
        >>> [c.key for c in forgetting_cells(FORGETTING_SCALES["tiny"], "runs/forgetting-tiny", "hallucination")]
        ['hallucination/base']
    """
    out = Path(out)
    if stage == "hallucination":
        return [Cell("hallucination/base", sc.base_config(), str(out / "hallucination" / "base"))]
    if stage == "rare":
        return [Cell("rare/base", sc.rare_config(), str(out / "rare" / "base"))]
    if stage == "rare_finetune":
        n_celebrities = sc.rare_config().sampler["n_celebrities"]
        config = finetune_config(out / "rare" / "base", seen_from=n_celebrities, old_weight=0.0, steps=sc.steps,
                                 lr=sc.lr, checkpoint_every=sc.checkpoint_every)
        return [Cell("rare/finetune", config, str(out / "rare" / "finetune"))]
    if stage != "finetune":
        raise ConfigError(f"unknown stage {stage!r}; choose hallucination, finetune, rare or rare_finetune.")
    base_dir = out / "hallucination" / "base"
    return [Cell(f"finetune/{cell_name(k, w, keep)}",
                 finetune_config(base_dir, n_new=k, old_weight=w, steps=sc.steps, lr=sc.lr, keep_optimizer=keep,
                                 checkpoint_every=sc.checkpoint_every),
                 str(out / "finetune" / cell_name(k, w, keep))) for k, w, keep in sc.all_cells()]


def cell_name(new_people: int, replay_weight: float, keep_optimizer: bool = False) -> str:
    """A fine-tuning cell's folder name: ``new{K}_w{W}``, with ``_keep`` when it carries the AdamW state over.

    Example:
        >>> from factlens.bios.reproduce_forgetting import cell_name
        >>> cell_name(20, 0.0), cell_name(20, 1 / 32, keep_optimizer=True)
        ('new20_w0', 'new20_w0.03125_keep')
    """
    return f"new{new_people}_w{replay_weight:g}" + ("_keep" if keep_optimizer else "")


def planned_configs(sc: ForgettingScale, out: str | Path, stages: tuple[str, ...]) -> tuple[int, list[TrainConfig]]:
    """``(training runs in all, configs still to train)`` of the ``hallucination`` / ``finetune`` ``stages``.

    A fine-tuning cell is built from its base run's last checkpoint; while that run is not finished, the cell
    counts as the base run's config at the fine-tuning length (what it costs per step).

    Example:
        >>> from factlens.bios.reproduce_forgetting import FORGETTING_SCALES, planned_configs
        >>> total, todo = planned_configs(FORGETTING_SCALES["tiny"], "runs/none-yet", ("finetune",))
        >>> total, len(todo), sorted({c.steps for c in todo})
        (8, 8, [10, 30])
    """
    groups = [("hallucination", "finetune", len(sc.all_cells()))]
    if "finetune" in stages and sc.rare is not None:
        groups.append(("rare", "rare_finetune", 1))
    total, todo = 0, []
    for base_stage, tune_stage, n_tuned in groups:
        (base,) = forgetting_cells(sc, out, base_stage)
        done = base.finished()
        total += 1
        todo += [] if done else [base.config]
        if "finetune" not in stages:
            continue
        total += n_tuned
        if done:
            todo += [c.config for c in forgetting_cells(sc, out, tune_stage) if not c.finished()]
        else:
            todo += [dataclasses.replace(base.config, steps=sc.steps, checkpoint_every=sc.checkpoint_every)] * n_tuned
    return total, todo


def _run(cells: list[Cell], result: ForgettingResult, run: dict) -> dict[str, TrainingHistory]:
    """Run the cells through the executor; record their statuses; the finished cells' histories."""
    report = run_cells(cells, **run)
    result.cells = CellsReport(result.cells.statuses + report.statuses, result.cells.submitted + report.submitted)
    done = report.finished
    result.trained += [k for k in report.submitted if k in done]
    result.missing += [s.cell.key for s in report.statuses if s.cell.key not in done]
    return {s.cell.key: s.cell.history() for s in report.statuses if s.cell.key in done}


def plateau_step(history: TrainingHistory) -> int | None:
    """The evaluation in the middle of the plateau: halfway between the first checkpoint within 10% of the
    no-knowledge baseline (end of the initial drop) and the plateau end (``None`` if either is missing)."""
    ev = history.evals
    near = ev.loc[ev["attr_loss"] < 1.1 * history.baseline, "step"]
    end = history.plateau_end()
    if not len(near) or end is None:
        return None
    mid = (int(near.iloc[0]) + end) / 2
    return int(ev["step"].iloc[(ev["step"] - mid).abs().argmin()])


def hallucination_table(history: TrainingHistory) -> pd.DataFrame:
    """Seen vs unseen people's metrics on the plateau (see :func:`plateau_step`) and at the end, with the paper's."""
    ev = history.evals.set_index("step")
    rows = []
    for phase, step in (("plateau", plateau_step(history)), ("end", int(ev.index.max()))):
        if step is None:
            continue
        for people, prefix in (("seen", ""), ("unseen", "unseen_")):
            row = {"phase": phase, "people": people, "step": step}
            for metric in ("attr_loss", "attr_acc", "top_prob", "entropy"):
                row[metric] = float(ev.loc[step, prefix + metric]) if prefix + metric in ev else None
                row["paper_" + metric] = PAPER_HALLUCINATION.get((phase, people, metric))
            rows.append(row)
    return pd.DataFrame(rows)


def reproduce_forgetting(scale: str | ForgettingScale = "cpu", out_dir: str | Path = "out/reproduce", *,
                         stages: tuple[str, ...] = STAGES, device=None, progress: bool = True,
                         train_missing: bool = True, executor: ExecutorConfig | None = None,
                         wait: bool = True) -> ForgettingResult:
    """Run (or resume) the §4 ``stages`` at ``scale`` under ``out_dir``; write the report and the summary.

    Args:
        scale: ``"tiny"`` (seconds), ``"cpu"`` (the demo model; see docs/reproduction.md for its wall time) or
            ``"gpu"`` (the paper's sizes), or a :class:`ForgettingScale`.
        stages: any of ``hallucination``, ``finetune`` (needs the hallucination stage's run, trained if missing),
            ``toy``.
        train_missing: ``False`` computes nothing and reports the finished cells only.
        executor: where the training cells run (:class:`~factlens.bios.executor.ExecutorConfig`; default: here,
            one after another). With ``kind="slurm"`` each stage is a job array (records and logs in
            ``out_dir/jobs``); the fine-tuning cells are submitted once the base run has finished.
        wait: wait for SLURM jobs; ``False`` returns once they are submitted (the fine-tuning cells are then
            submitted by a later call, after the base run finished).
    """
    bad = sorted(set(stages) - set(STAGES))
    if bad or not stages:
        raise ConfigError(f"unknown stages {bad or stages}; choose from {list(STAGES)}.")
    if isinstance(scale, str) and scale not in FORGETTING_SCALES:
        raise ConfigError(f"unknown scale {scale!r}; choose one of {sorted(FORGETTING_SCALES)} or pass a "
                          "ForgettingScale.")
    sc = FORGETTING_SCALES[scale] if isinstance(scale, str) else scale
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = ForgettingResult(scale=scale if isinstance(scale, str) else sc.preset)
    run = dict(executor=executor, jobs_dir=out / "jobs", wait=wait, submit=train_missing, device=device,
               progress=progress)
    base = rare = None
    if "hallucination" in stages or "finetune" in stages:
        rare_cells = forgetting_cells(sc, out, "rare") if "finetune" in stages and sc.rare is not None else []
        pre = _run(forgetting_cells(sc, out, "hallucination") + rare_cells, result, run)
        base, rare = pre.get("hallucination/base"), pre.get("rare/base")
        if base is not None:
            result.hallucination = hallucination_table(base)
            result.histories["base"] = base
    if "finetune" in stages and base is not None:
        rows = []
        n_old = sc.base_config().n_people
        histories = _run(forgetting_cells(sc, out, "finetune"), result, run)
        for k, w, keep in sc.all_cells():
            name = cell_name(k, w, keep)
            history = histories.get(f"finetune/{name}")
            if history is None:
                continue
            result.histories[name] = history
            rows.append({"new_people": k, "new_fraction": k / n_old, "replay_weight": w,
                         "optimizer": "pre-training" if keep else "fresh", **forgetting_summary(history)})
        result.finetune = pd.DataFrame(rows)
        if rare is not None:
            tuned = _run(forgetting_cells(sc, out, "rare_finetune"), result, run).get("rare/finetune")
            if tuned is not None:
                result.histories["rare"] = tuned
                n_celebrities = sc.rare_config().sampler["n_celebrities"]
                result.rare = pd.DataFrame([{"celebrities": n_celebrities,
                                             "non_celebrities": sc.base_config().n_people - n_celebrities,
                                             "celebrity_weight": sc.rare[1], **forgetting_summary(tuned)}])
        biggest = out / "finetune" / cell_name(max(sc.new_sizes), 0.0)
        if biggest.name in result.histories:
            result.drift = attention_drift(biggest, n_sequences=sc.drift_sequences, device=device or "cpu",
                                           progress=progress)
    if "toy" in stages:
        result.toy = _toy(ToyMemoryConfig.preset(sc.toy), out / "toy", result, progress, train_missing)
    result.wall_s = time.perf_counter() - t0
    _write_report(result, sc, out)
    return result


def _toy(config: ToyMemoryConfig, path: Path, result: ForgettingResult, progress: bool,
         train_missing: bool) -> ToyMemoryResult | None:
    if (path / "toy.json").exists():
        return ToyMemoryResult.load(path, config)  # another config's result is refused
    if not train_missing:
        result.missing.append("toy")
        return None
    if path.exists() and any(path.iterdir()):
        raise CheckpointError(f"{path} is not empty and holds no toy-memory result; move its files away.")
    toy = run_toy_memory(config, progress=progress)
    toy.save(path)
    result.trained.append("toy")
    return toy


# ------------------------------------------------------------------------------------------------ report
def _figures(result: ForgettingResult) -> dict:
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    figs = {}
    if "base" in result.histories:
        figs["hallucination"] = result.histories["base"].plot("Pre-training: seen people (held-out templates) vs "
                                                              "people never seen (dotted)")
    # the fine-tuning cells by their table rows (people, replay weight, optimizer), never by parsing names
    rows = [] if result.finetune is None else result.finetune.to_dict("records")
    cells = {cell_name(r["new_people"], r["replay_weight"], r["optimizer"] == "pre-training"): r for r in rows}
    if cells:
        fig = make_subplots(rows=1, cols=2, subplot_titles=("Old people's accuracy", "New people's accuracy"))
        for name, r in cells.items():
            ev = result.histories[name].evals
            for col, metric in ((1, "old_attr_acc"), (2, "new_attr_acc")):
                fig.add_trace(go.Scatter(x=ev["step"], y=ev[metric], mode="lines", name=name,
                                         legendgroup=name, showlegend=col == 1,
                                         line=dict(dash="solid" if r["replay_weight"] == 0 else "dot",
                                                   width=3 if r["optimizer"] == "pre-training" else 2)), 1, col)
        fig.update_xaxes(title_text="fine-tuning step")
        fig.update_yaxes(title_text="fraction of values", range=[0, 1.02])
        fig.update_layout(template="plotly_white", height=430, width=1050,
                          title="Fine-tuning on new people: newK_wW = K new people, replay weight W (solid: none); "
                                "_keep: pre-training AdamW state")
        figs["forgetting"] = fig
    twins = [(cell_name(r["new_people"], r["replay_weight"]), name) for name, r in cells.items()
             if r["optimizer"] == "pre-training" and cell_name(r["new_people"], r["replay_weight"]) in cells]
    if twins:
        fig = go.Figure()
        colors = qualitative.D3
        for i, (fresh, kept) in enumerate(twins):
            for run, label, dash in ((fresh, "fresh AdamW", "solid"), (kept, "pre-training AdamW", "dash")):
                ev = result.histories[run].evals
                fig.add_scatter(x=ev["step"], y=ev["old_attr_acc"], mode="lines", name=f"{fresh}: {label}",
                                line=dict(dash=dash, color=colors[i % len(colors)]))
        fig.update_layout(template="plotly_white", height=420, width=850, xaxis_title="fine-tuning step",
                          yaxis_title="old people's accuracy", yaxis_range=[0, 1.02],
                          title="Fine-tuning with a fresh AdamW (solid) or the pre-training run's state (dashed)")
        figs["optimizer"] = fig
    if "rare" in result.histories:
        ev = result.histories["rare"].evals
        fig = go.Figure()
        fig.add_scatter(x=ev["step"], y=ev["old_attr_acc"], mode="lines+markers", name="celebrities (not trained on)")
        fig.add_scatter(x=ev["step"], y=ev["new_attr_acc"], mode="lines+markers",
                        name="non-celebrities (fine-tuned on; already seen)")
        fig.update_layout(template="plotly_white", height=400, width=800, xaxis_title="fine-tuning step",
                          yaxis_title="attribute accuracy", yaxis_range=[0, 1.02],
                          title="Fine-tuning a celebrity run on its rare, already-seen people (Fig. P)")
        figs["rare"] = fig
    if result.drift is not None:
        figs["attention_drift"] = result.drift.plot()
    if result.toy is not None:
        figs["toy"] = result.toy.plot()
    return figs


_TEMPLATE = """<!doctype html><html><head><meta charset="utf-8"><title>factlens §4 reproduction ({{ scale }})</title>
<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>
<h1>Zucchet et al. (2025) §4 with factlens: {{ scale }} scale</h1>
<p>Command: <code>factlens bios reproduce --scale {{ scale }} --stages {{ stages }} --out {{ out }}</code>.
This call computed {{ trained|length }} cells in {{ "%.0f"|format(wall_s) }} s; finished cells are read, not
recomputed.</p>{% if missing %}<p><b>Not finished yet:</b> {{ missing|join(", ") }}.</p>{% endif %}
{% for f in failed %}<p><b>Failed: {{ f.cell }}</b>{% if f.job_id %} (SLURM job {{ f.job_id }}, log {{ f.log }}){% endif %}
<pre>{{ f.error }}</pre></p>{% endfor %}
{% if hallucination %}<h2>Hallucinations over pre-training</h2>{{ figs.hallucination }}{{ hallucination }}{% endif %}
{% if finetune %}<h2>Fine-tuning, forgetting and replay</h2>{{ figs.forgetting }}{{ finetune }}{% endif %}
{% if figs.optimizer %}<h2>Optimizer state</h2>{{ figs.optimizer }}{% endif %}
{% if figs.rare %}<h2>Fine-tuning on rare, already-seen people</h2>{{ figs.rare }}{{ rare }}{% endif %}
{% if figs.attention_drift %}<h2>Attention drift during fine-tuning</h2>{{ figs.attention_drift }}{% endif %}
{% if figs.toy %}<h2>Toy associative memory</h2>{{ figs.toy }}{{ toy }}{% endif %}
</body></html>"""


def _write_report(result: ForgettingResult, sc: ForgettingScale, out: Path) -> None:
    import jinja2

    figs = result.figures()
    html_figs = {k: f.to_html(full_html=False, include_plotlyjs="cdn" if i else True)
                 for i, (k, f) in enumerate(figs.items())}

    def table(df):
        return None if df is None or df.empty else df.to_html(index=False, float_format=lambda v: f"{v:.4g}",
                                                             na_rep="–")

    toy = result.toy.final() if result.toy is not None else None
    failed = [{"cell": s.cell.key, "job_id": s.job_id, "log": s.log, "error": s.error} for s in result.cells.failed]
    stages = " ".join(s for s, v in (("hallucination", result.hallucination), ("finetune", result.finetune),
                                     ("toy", result.toy)) if v is not None)
    html = jinja2.Template(_TEMPLATE).render(
        scale=result.scale, out=str(out), trained=result.trained, wall_s=result.wall_s, missing=result.missing,
        figs=html_figs, hallucination=table(result.hallucination), finetune=table(result.finetune),
        rare=table(result.rare), toy=table(toy), stages=stages, failed=failed)
    result.report = out / "forgetting_report.html"
    atomic_write(result.report, html)
    summary = {"scale": result.scale, "scale_config": dataclasses.asdict(sc), "trained": result.trained,
               "missing": result.missing, "failed": failed, "wall_s": result.wall_s,
               "hallucination": None if result.hallucination is None else result.hallucination.to_dict("records"),
               "finetune": None if result.finetune is None else result.finetune.to_dict("records"),
               "rare": None if result.rare is None else result.rare.to_dict("records"),
               "attention_drift": None if result.drift is None else result.drift.to_dataframe().to_dict("records"),
               "toy": None if toy is None else {"pretrain_acc": result.toy.pretrain_acc, "wall_s": result.toy.wall_s,
                                                "final": toy.to_dict("records")}}
    atomic_write(out / "forgetting_summary.json", json.dumps(summary, indent=1, default=float))


__all__ = ["FORGETTING_SCALES", "STAGES", "ForgettingResult", "ForgettingScale", "cell_name", "forgetting_cells",
           "hallucination_table", "planned_configs", "plateau_step", "reproduce_forgetting"]
