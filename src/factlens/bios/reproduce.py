"""Zucchet et al.'s headline experiments in one resumable command, with an HTML report.

:func:`reproduce` runs three stages under ``out_dir`` and writes ``out_dir/report.html`` (plus PNGs when
kaleido can export, and ``summary.json``):

1. **Plateau vs population** (``scaling/N{n}``): one run per population size, all on the same schedule; the
   plateau end of each (the ratio reading, :func:`factlens.bios.phases.plateau_end`, its ``ratio`` a parameter), a power law
   ``c · N^k`` fitted to them, and the paper's ``0.43 · N^0.81`` steps at batch 128 beside it.
2. **Attention patching** (``patching/ref{R}_start{S}``): attention patterns of reference checkpoints from
   before, during and after the plateau, patched into fresh runs (same initialisation, same data) from step
   0 (``S = 0``) and, where the scale asks for it, frozen at the reference (``S = R``). The unpatched control
   is the scaling run of the same population. Table: loss at an early step and final loss (the paper's
   layout: one column per reference step).
3. **Curriculum** (``curriculum/alpha{a}``): inverse-power-law sampling of people at a few α against
   uniform sampling (again the scaling run), plateau end for each.

Every cell is a run directory (a :class:`~factlens.bios.cells.Cell`); a cell whose run finished is read, not
retrained, so an interrupted ``reproduce`` resumes where it stopped (unfinished runs resume from their last
resume checkpoint). The cells train here or as SLURM job arrays (``executor``; docs/cluster.md).

Example:
    >>> from factlens.bios.reproduce import reproduce
    >>> result = reproduce("tiny", "runs/repro-tiny", progress=False)      # doctest: +SKIP
    >>> result.fit                                                          # doctest: +SKIP
    >>> result                                                              # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from factlens.bios.cells import Cell
from factlens.bios.config import TrainConfig
from factlens.bios.executor import CellsNotFinished, CellsReport, CellStatus, ExecutorConfig, run_cells
from factlens.bios.history import TrainingHistory
from factlens.bios.patching.config import PatchConfig
from factlens.errors import ConfigError
from factlens.figures import png_support
from factlens.storage import atomic_write

PAPER_FIT = (0.43, 0.81)  # plateau end ≈ 0.43 · N^0.81 steps at batch 128 (Zucchet et al., Fig. 3)
PAPER_BATCH = 128
MACHINE = "2-core CPU, 24 GiB, no GPU"


@dataclass(frozen=True)
class Scale:
    """What one scale of the reproduction trains.

    Attributes:
        preset: the :class:`TrainConfig` preset every run starts from; ``overrides`` change it (the same for
            every run: one schedule).
        populations: population sizes of the scaling stage (≥ 4, spanning ≥ 8×).
        patch_people: the population of the patching stage (must be one of ``populations``: its scaling run
            is the reference and the unpatched control).
        reference_steps: reference checkpoints patched in (≥ 5, including 0).
        freeze: also run "frozen at the reference" (start patching = reference step).
        early_step: the step whose loss the patching table reports beside the final loss.
        curriculum_people: the population of the curriculum stage (one of ``populations``).
        alphas: power-law exponents of the curriculum stage.
    """

    preset: str
    overrides: dict
    populations: tuple[int, ...]
    patch_people: int
    reference_steps: tuple[int, ...]
    early_step: int
    curriculum_people: int
    alphas: tuple[float, ...]
    freeze: bool = False

    def config(self, n_people: int, **extra) -> TrainConfig:
        return TrainConfig.preset(self.preset, **{**self.overrides, "n_people": n_people, **extra})


# "cpu": the demo recipe (2 layers x 4 heads x d_model 128, batch 32, LR 2e-3 cosine to 4e-4, ten values per
# attribute, 24 birth dates) on its 1,800-step schedule for every population (160 to 1,300 people: 8x); patching
# at the demo's own N = 650, with references before (0, 150), during (450, 800: the end of the plateau) and after
# (1800) the plateau; the curriculum at N = 1,300, whose uniform plateau is the longest.
SCALES: dict[str, Scale] = {
    "tiny": Scale(preset="tiny", overrides=dict(steps=12, checkpoint_every=3, n_eval_sequences=16, n_unseen=0,
                                               resume_every=6, pools=dict(first_names=20, last_names=20, cities=10,
                                                                          universities=10, majors=10, companies=10,
                                                                          years=2)),
                  populations=(16, 32, 64, 128), patch_people=32, reference_steps=(0, 3, 6, 9, 12), early_step=6,
                  curriculum_people=64, alphas=(0.6, 0.8)),
    "cpu": Scale(preset="demo", overrides=dict(n_unseen=0),
                 populations=(160, 325, 650, 1300), patch_people=650, reference_steps=(0, 150, 450, 800, 1800),
                 early_step=600, curriculum_people=1300, alphas=(0.6, 0.8)),
    "gpu": Scale(preset="paper", overrides=dict(steps=16_000, n_unseen=0),
                 populations=(4_000, 8_000, 16_000, 32_000, 64_000), patch_people=64_000,
                 reference_steps=(0, 500, 1000, 2000, 4000, 8000, 16_000), early_step=2000,
                 curriculum_people=64_000, alphas=(0.6, 0.7, 0.8), freeze=True),
}


@dataclass
class ReproduceResult:
    """Tables of the three stages, the fitted power law and where the report is.

    Attributes:
        scaling: one row per population: ``n_people``, ``plateau_end`` (steps), ``sequences`` (steps × batch).
        fit: ``{"coef", "exponent"}`` of ``plateau_end ≈ coef · N^exponent`` (steps), NaN if < 2 points.
        patching: one row per patched cell: ``reference_step``, ``start_patching``, ``loss_early``, ``final_loss``.
        curriculum: one row per sampler: ``sampler``, ``alpha``, ``plateau_end``.
        report: path of ``report.html``. pngs: PNGs written (empty without kaleido).
        trained: cells trained by this call (finished cells are only read). wall_s: this call's wall time.
    """

    scale: str
    scaling: pd.DataFrame
    fit: dict
    patching: pd.DataFrame
    curriculum: pd.DataFrame
    curves: dict[str, dict[int | str, pd.DataFrame]]
    baseline: float
    report: Path
    pngs: list[Path] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    png_note: str = ""
    control: dict = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    cells: CellsReport | None = None

    def to_dataframe(self) -> pd.DataFrame:
        """The plateau-vs-population table (the headline)."""
        return self.scaling.copy()

    def patching_table(self) -> pd.DataFrame:
        """The paper's layout: rows = (mode, quantity), columns = reference step."""
        t = self.patching.assign(mode=np.where(self.patching["start_patching"] == 0, "patched from step 0",
                                               "frozen at reference"))
        long = t.melt(id_vars=["mode", "reference_step"], value_vars=["loss_early", "final_loss"], var_name="quantity")
        return long.pivot_table(index=["mode", "quantity"], columns="reference_step", values="value")

    def figures(self) -> dict:
        """``{name: plotly Figure}`` of the report."""
        return _figures(self)

    def plot(self):
        """Plateau end against population, log-log, with the fit and the paper's law."""
        return self.figures()["plateau_vs_population"]

    def fit_text(self) -> str:
        """``"plateau end ≈ 2.25 · N^0.89 steps"``, or why there is no fit (never NaN)."""
        if math.isnan(self.fit["coef"]):
            return (f"no fit of plateau end vs N ({self.fit.get('n_points', 0)} population(s) reached a plateau end; "
                    "a fit needs 2)")
        return f"plateau end ≈ {self.fit['coef']:.3g} · N^{self.fit['exponent']:.2f} steps"

    def __repr__(self) -> str:
        ends = ", ".join(f"N={int(r.n_people)}: {r.plateau_end}" for r in self.scaling.itertuples())
        smoke = "SMOKE RUN (tiny scale: tests the pipeline, its numbers mean nothing), " if self.scale == "tiny" else ""
        return (f"ReproduceResult({smoke}scale={self.scale!r}, plateau ends [{ends}], {self.fit_text()} "
                f"(paper 0.43·N^0.81 at batch 128), {len(self.patching)} patched cells, "
                f"{len(self.curriculum)} samplers, trained {len(self.trained)} cells, report {self.report})")


def reproduce_cells(scale: str | Scale, out_dir: str | Path, stage: str) -> list[Cell]:
    """The cells of one stage (``"scaling"``, ``"patching"`` or ``"curriculum"``) of a scale under ``out_dir``.

    Example:
        >>> from factlens.bios.reproduce import reproduce_cells
        >>> [c.key for c in reproduce_cells("tiny", "runs/repro", "curriculum")]
        ['curriculum/alpha0.6', 'curriculum/alpha0.8']
    """
    sc, out = _scale(scale), Path(out_dir)

    def cell(key: str, config: TrainConfig) -> Cell:
        return Cell(key, config, str(out / key))

    if stage == "scaling":
        return [cell(f"scaling/N{n}", sc.config(n)) for n in sc.populations]
    if stage == "curriculum":
        return [cell(f"curriculum/alpha{a:g}", sc.config(sc.curriculum_people, sampler={"kind": "power_law", "alpha": a}))
                for a in sc.alphas]
    if stage == "patching":
        base, control = sc.config(sc.patch_people), out / "scaling" / f"N{sc.patch_people}"
        cells = []
        for ref in sc.reference_steps:
            for start in sorted({0, ref} if sc.freeze else {0}):
                if start == ref == base.steps:
                    continue  # frozen at the last step is the control itself
                patch = PatchConfig(reference=str(control), reference_step=ref, start_patching=start)
                cells.append(cell(f"patching/ref{ref}_start{start}", dataclasses.replace(base, patch=patch)))
        return cells
    raise ConfigError(f"unknown stage {stage!r}; choose scaling, patching or curriculum.")


def fit_power_law(n: Iterable[float], steps: Iterable[float | None]) -> dict:
    """Least-squares fit of ``steps ≈ coef · n^exponent`` in log-log space (NaN with fewer than 2 points; a
    missing step, None or NaN, is skipped). ``n`` and ``steps`` may be lists, arrays or pandas columns.

    Example:
        >>> from factlens.bios.reproduce import fit_power_law
        >>> fit = fit_power_law([1000, 2000, 4000], [0.43 * x ** 0.81 for x in (1000, 2000, 4000)])
        >>> round(fit["coef"], 2), round(fit["exponent"], 2)
        (0.43, 0.81)
    """
    pts = [(float(a), float(b)) for a, b in zip(n, steps) if b is not None and not math.isnan(float(b)) and b > 0]
    if len(pts) < 2:
        return {"coef": float("nan"), "exponent": float("nan"), "n_points": len(pts)}
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    k, logc = np.polyfit(x, y, 1)
    return {"coef": float(np.exp(logc)), "exponent": float(k), "n_points": len(pts)}


def _loss_at(history: TrainingHistory, step: int) -> float:
    ev = history.evals
    row = ev.iloc[int(np.argmin(np.abs(ev["step"].to_numpy() - step)))]
    return float(row["attr_loss"])


def reproduce(scale: str | Scale = "cpu", out_dir: str | Path = "out/reproduce", *, plateau_ratio: float = 0.98,
              plateau_min_step: int | None = None, device=None, progress: bool = True,
              write_png: bool = True, train_missing: bool = True, executor: ExecutorConfig | None = None,
              wait: bool = True) -> ReproduceResult:
    """Run (or resume) the three stages at ``scale`` under ``out_dir`` and write the report.

    Args:
        scale: ``"tiny"`` (seconds: a smoke run for tests), ``"cpu"`` (32 min on 2 idle CPU cores) or
            ``"gpu"`` (the paper preset: 8 layers, d_model 512, batch 128, N up to 64k), or a :class:`Scale`.
        out_dir: where the cells and the report go.
        plateau_ratio, plateau_min_step: the plateau-end rule (first checkpoint below ``ratio × baseline`` at
            or after ``min_step``; default ``min_step``: where the loss first came within 10% of the baseline).
        write_png: also export each figure as PNG (needs kaleido and a Chrome; skipped, and said so, if not).
        train_missing: ``False`` trains nothing and reports only the finished cells (unfinished ones are
            listed as missing), e.g. to look at a long run while it is still going, or to collect the cells
            that finished on SLURM.
        executor: where the cells train (:class:`~factlens.bios.executor.ExecutorConfig`; default: here, one
            after another). With ``kind="slurm"`` every stage is a job array; SLURM job records and logs go to
            ``out_dir/jobs``, and a later call never resubmits a finished, queued or running cell.
        wait: wait for the cells (a progress bar over finished cells); ``False`` returns once they are
            submitted, raising :class:`~factlens.bios.executor.CellsNotFinished` while the controls are unfinished.

    Raises:
        ConfigError: an unknown scale, or a scale whose patching/curriculum population is not swept.
        CellsNotFinished: the control runs are not finished yet (queued, failed, or not trained); it carries
            every cell's status.
    """
    sc = _scale(scale)
    from factlens.bios.phases import check_plateau_ratio

    check_plateau_ratio(plateau_ratio)  # before any training: a bad rule would only show in the report
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rule = dict(ratio=plateau_ratio, min_step=plateau_min_step)
    run = dict(executor=executor, jobs_dir=out / "jobs", wait=wait, submit=train_missing, device=device,
               progress=progress)

    # the scaling and curriculum cells first; the patching cells need the control's checkpoints (on SLURM
    # without waiting, they are submitted at once to start after the control's job)
    first = run_cells(reproduce_cells(sc, out, "scaling") + reproduce_cells(sc, out, "curriculum"), **run)
    control_key = f"scaling/N{sc.patch_people}"
    patch_cells = reproduce_cells(sc, out, "patching")
    queued = next(s for s in first.statuses if s.cell.key == control_key)
    if queued.state == "finished":
        second = run_cells(patch_cells, **run)
    elif queued.state in ("pending", "running") and queued.job_id:  # queued on SLURM: start after it
        second = run_cells(patch_cells, **run, after=[queued.job_id])
    else:
        second = CellsReport([CellStatus(c, "not started", error=f"waits for its reference run {control_key}")
                              for c in patch_cells])
    cells = CellsReport(first.statuses + second.statuses, first.submitted + second.submitted)
    done = cells.finished
    histories = {s.cell.key: s.cell.history() for s in cells.statuses if s.cell.key in done}
    missing = [s.cell.key for s in cells.statuses if s.cell.key not in done]
    needed = [control_key, f"scaling/N{sc.curriculum_people}"]
    if not all(k in done for k in needed):
        fix = ("Run the same command again (or with --collect) once the queued cells have finished." if cells.waiting
               else "Fix the failures shown, then run the same command again." if cells.failed
               else "Run reproduce with train_missing=True (without --report-only / --collect) to train them.")
        raise CellsNotFinished(f"the control runs {needed} are not finished, so there is no report yet. {fix}",
                               cells)

    # 1. plateau vs population: one schedule for every N
    runs = {n: histories[f"scaling/N{n}"] for n in sc.populations if f"scaling/N{n}" in histories}
    batch = sc.config(sc.populations[0]).batch_size
    scaling = pd.DataFrame([{"n_people": n, "plateau_end": h.plateau_end(**rule), "final_loss": h.final["attr_loss"],
                             "final_acc": h.final["attr_acc"]} for n, h in runs.items()])
    scaling["sequences"] = scaling["plateau_end"].astype(float) * batch
    scaling["paper_steps_at_own_batch"] = PAPER_FIT[0] * scaling["n_people"] ** PAPER_FIT[1] * PAPER_BATCH / batch
    fit = fit_power_law(scaling["n_people"], scaling["plateau_end"].astype(float))

    # 2. attention patching into fresh runs from step 0 (and frozen at the reference)
    rows, curves = [], {"control (unpatched)": runs[sc.patch_people].evals[["step", "attr_loss", "attr_acc"]]}
    for cell in patch_cells:
        if cell.key not in histories:
            continue
        h, patch = histories[cell.key], cell.config.patch
        ref, start = patch.reference_step, patch.start_patching
        rows.append({"reference_step": ref, "start_patching": start, "loss_early": _loss_at(h, sc.early_step),
                     "final_loss": h.final["attr_loss"], "final_acc": h.final["attr_acc"],
                     "plateau_end": h.plateau_end(**rule)})
        label = f"reference step {ref}" + ("" if start == 0 else f", frozen at {ref}")
        curves[label] = h.evals[["step", "attr_loss", "attr_acc"]]
    control = runs[sc.patch_people]
    rows.append({"reference_step": None, "start_patching": None, "loss_early": _loss_at(control, sc.early_step),
                 "final_loss": control.final["attr_loss"], "final_acc": control.final["attr_acc"],
                 "plateau_end": control.plateau_end(**rule)})
    patching = pd.DataFrame(rows)

    # 3. curriculum: inverse power law over people at a few alpha, against uniform
    uni = runs[sc.curriculum_people]
    crow = [{"sampler": "uniform", "alpha": 0.0, "plateau_end": uni.plateau_end(**rule),
             "final_loss": uni.final["attr_loss"]}]
    ccurves = {"uniform": uni.evals[["step", "attr_loss"]]}
    for a in sc.alphas:
        h = histories.get(f"curriculum/alpha{a:g}")
        if h is None:
            continue
        crow.append({"sampler": "power_law", "alpha": a, "plateau_end": h.plateau_end(**rule),
                     "final_loss": h.final["attr_loss"]})
        ccurves[f"power law α={a:g}"] = h.evals[["step", "attr_loss"]]
    curriculum = pd.DataFrame(crow)

    result = ReproduceResult(
        scale=sc.preset if isinstance(scale, Scale) else scale, scaling=scaling, fit=fit,
        patching=patching[patching["reference_step"].notna()].astype({"reference_step": int, "start_patching": int}),
        curriculum=curriculum,
        curves={"scaling": {n: h.evals[["step", "attr_loss", "attr_acc"]] for n, h in runs.items()},
                "patching": curves, "curriculum": ccurves},
        baseline=control.baseline, report=out / "report.html", missing=missing, cells=cells,
        trained=[k for k in cells.submitted if k in done])
    result.control = patching.iloc[-1].to_dict()
    result.wall_s = time.perf_counter() - t0
    _write_report(result, sc, out, rule, write_png)
    return result


def with_overrides(scale: str | Scale, overrides: dict) -> Scale:
    """``scale`` with ``overrides`` applied to every cell's config (``model``: merged into the preset's model),
    e.g. the weight decay, AdamW betas or model size of ``factlens bios reproduce``; checked on one cell.

    Example:
        >>> from factlens.bios.reproduce import with_overrides
        >>> with_overrides("tiny", {"weight_decay": 0.3}).config(16).weight_decay
        0.3
    """
    sc = _scale(scale)
    if not overrides:
        return sc
    merged = {**sc.overrides, **overrides}
    if "model" in overrides:
        merged["model"] = {**sc.overrides.get("model", {}), **overrides["model"]}
    out = dataclasses.replace(sc, overrides=merged)
    out.config(out.populations[0])  # refuses a bad value before anything trains
    return out


def _scale(scale: str | Scale) -> Scale:
    if isinstance(scale, Scale):
        sc = scale
    elif scale in SCALES:
        sc = SCALES[scale]
    else:
        raise ConfigError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)} or pass a Scale.")
    if sc.patch_people not in sc.populations or sc.curriculum_people not in sc.populations:
        raise ConfigError("patch_people and curriculum_people must be among the populations (their scaling runs "
                          "are the unpatched control and the uniform sampler); add them to populations.")
    steps = sc.config(sc.patch_people).checkpoint_steps()
    missing = sorted(set(sc.reference_steps) - set(steps))
    if missing:
        raise ConfigError(f"reference steps {missing} are not on the checkpoint schedule {steps[:8]}...; "
                          "pick checkpoint steps or set checkpoint_every.")
    return sc


# ------------------------------------------------------------------------------------------------ report
def _figures(result: ReproduceResult) -> dict:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    base = result.baseline
    figs = {}
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Attribute loss per population", "Plateau end vs population"))
    for n, ev in result.curves["scaling"].items():
        fig.add_trace(go.Scatter(x=ev["step"], y=ev["attr_loss"], mode="lines", name=f"N = {n}",
                                 hovertemplate=f"N={n}<br>step %{{x}}<br>loss %{{y:.3f}} nats<extra></extra>"), 1, 1)
    steps = max(ev["step"].max() for ev in result.curves["scaling"].values())
    fig.add_trace(go.Scatter(x=[0, steps], y=[base, base], mode="lines", name=f"no knowledge ({base:.2f} nats)",
                             line=dict(color="grey", dash="dash")), 1, 1)
    s = result.scaling.dropna(subset=["plateau_end"])
    fig.add_trace(go.Scatter(x=s["n_people"], y=s["plateau_end"], mode="markers", marker=dict(size=10, color="black"),
                             name="measured plateau end"), 1, 2)
    n = np.geomspace(result.scaling["n_people"].min(), result.scaling["n_people"].max(), 50)
    if not math.isnan(result.fit["coef"]):
        fig.add_trace(go.Scatter(x=n, y=result.fit["coef"] * n ** result.fit["exponent"], mode="lines",
                                 name=f"fit {result.fit['coef']:.3g}·N^{result.fit['exponent']:.2f}"), 1, 2)
    batch_ratio = float(result.scaling["paper_steps_at_own_batch"].iloc[0] /
                        (PAPER_FIT[0] * result.scaling["n_people"].iloc[0] ** PAPER_FIT[1]))
    fig.add_trace(go.Scatter(x=n, y=PAPER_FIT[0] * n ** PAPER_FIT[1] * batch_ratio, mode="lines",
                             line=dict(dash="dot"), name="paper 0.43·N^0.81 (same sequences seen)"), 1, 2)
    fig.update_yaxes(type="log", title_text="attribute loss (nats)", row=1, col=1)
    fig.update_xaxes(title_text="training step", row=1, col=1)
    fig.update_xaxes(type="log", title_text="population N (people)", row=1, col=2)
    fig.update_yaxes(type="log", title_text="plateau end (steps)", row=1, col=2)
    fig.update_layout(template="plotly_white", height=430, width=1050, title="Plateau length grows with the population")
    figs["plateau_vs_population"] = fig

    fig = go.Figure()
    for label, ev in result.curves["patching"].items():
        fig.add_trace(go.Scatter(x=ev["step"], y=ev["attr_loss"], mode="lines", name=label,
                                 line=dict(width=3 if label.startswith("control") else 1.5,
                                           color="black" if label.startswith("control") else None)))
    fig.add_trace(go.Scatter(x=[0, steps], y=[base, base], mode="lines", name="no knowledge",
                             line=dict(color="grey", dash="dash")))
    fig.update_yaxes(type="log", title_text="attribute loss (nats, log scale)")
    fig.update_xaxes(title_text="training step")
    fig.update_layout(template="plotly_white", height=450, width=900,
                      title="Attention patterns patched in from reference checkpoints (fresh runs from step 0)")
    figs["patching"] = fig

    fig = go.Figure()
    for label, ev in result.curves["curriculum"].items():
        fig.add_trace(go.Scatter(x=ev["step"], y=ev["attr_loss"], mode="lines", name=label))
    fig.add_trace(go.Scatter(x=[0, steps], y=[base, base], mode="lines", name="no knowledge",
                             line=dict(color="grey", dash="dash")))
    fig.update_yaxes(type="log", title_text="attribute loss (nats, log scale; uniform evaluation)")
    fig.update_xaxes(title_text="training step")
    fig.update_layout(template="plotly_white", height=420, width=900, title="Inverse-power-law sampling of people")
    figs["curriculum"] = fig
    return figs


_TEMPLATE = """<!doctype html><html><head><meta charset="utf-8"><title>factlens reproduction ({{ scale }})</title>
<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>
<h1>Zucchet et al. (2025) with factlens: {{ scale }} scale</h1>
{% if scale == "tiny" %}<p style="background:#fde2e1;border:1px solid #e0a5a1;padding:10px 14px;border-radius:6px">
<b>Smoke run.</b> The tiny scale trains a few dozen steps on a handful of people to test that every stage runs;
none of its numbers says anything about knowledge acquisition. Run <code>--scale cpu</code> (or
<code>gpu</code>) for results.</p>{% endif %}
<p>Command: <code>factlens bios reproduce --scale {{ scale }} --out {{ out }}</code>. Plateau end: first checkpoint
with attribute loss &lt; {{ ratio }} × baseline ({{ "%.3f"|format(baseline) }} nats) after the initial drop.
This call trained {{ trained|length }} cells in {{ "%.0f"|format(wall_s) }} s; finished cells are read, not retrained.
{{ png_note }}</p>{% if missing %}<p><b>Not finished yet (not in the tables):</b> {{ missing|join(", ") }}.</p>{% endif %}
{% if failed %}<h2>Failed cells</h2>{% for f in failed %}<p><b>{{ f.cell }}</b>{% if f.job_id %} (SLURM job {{ f.job_id }},
log <code>{{ f.log }}</code>){% endif %}</p><pre>{{ f.error }}</pre>{% endfor %}{% endif %}
<h2>1. Plateau vs population</h2>{{ figs.plateau_vs_population }}{{ scaling }}
<p>{% if fit.coef == fit.coef %}Fit: plateau end ≈ {{ "%.3g"|format(fit.coef) }} · N<sup>{{ "%.2f"|format(fit.exponent) }}</sup> steps
{% else %}No fit: {{ fit.n_points|default(0) }} population(s) reached a plateau end, and a fit needs 2 {% endif %}
(paper: 0.43 · N<sup>0.81</sup> steps at batch 128).</p>
<h2>2. Attention patching</h2>{{ figs.patching }}{{ patching }}
<p>Unpatched control: loss {{ "%.3f"|format(control.loss_early) }} at step {{ early_step }},
final {{ "%.3f"|format(control.final_loss) }} nats.</p>
<h2>3. Curriculum</h2>{{ figs.curriculum }}{{ curriculum }}
</body></html>"""


def _write_report(result: ReproduceResult, sc: Scale, out: Path, rule: dict, write_png: bool) -> None:
    import jinja2

    figs = result.figures()
    html_figs = {k: f.to_html(full_html=False, include_plotlyjs="cdn" if i else True) for i, (k, f) in enumerate(figs.items())}
    html = jinja2.Template(_TEMPLATE).render(
        scale=result.scale, out=str(out), ratio=rule["ratio"], baseline=result.baseline, trained=result.trained,
        wall_s=result.wall_s, figs=html_figs, fit=result.fit, control=result.control, early_step=sc.early_step,
        scaling=result.scaling.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="not reached"),
        patching=result.patching_table().to_html(float_format=lambda v: f"{v:.3f}"),
        curriculum=result.curriculum.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="not reached"),
        png_note="{png_note}", missing=result.missing, failed=_failed(result))
    png_ok, png_why = png_support()
    if write_png and not png_ok:
        result.png_note = f"No PNGs: {png_why}; the HTML is complete."
    elif write_png:
        failed = []
        for name, fig in figs.items():
            path = out / f"{name}.png"
            for attempt in range(2):  # kaleido's Chrome sometimes fails its first page load: one retry
                try:
                    atomic_write(path, fig.to_image(format="png", scale=1.5))
                    result.pngs.append(path)
                    break
                except Exception as exc:  # a browser that failed twice: the HTML is the report
                    if attempt:
                        failed.append(f"{name} ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})")
        result.png_note = (f"PNGs: {', '.join(p.name for p in result.pngs) or 'none'}."
                           + (f" PNG export failed for {'; '.join(failed)}; the HTML is complete." if failed else ""))
    else:
        result.png_note = "PNG export not requested."
    atomic_write(result.report, html.replace("{png_note}", result.png_note))
    summary = {"scale": result.scale, "fit": result.fit, "scaling": result.scaling.to_dict("records"),
               "patching": result.patching.to_dict("records"), "curriculum": result.curriculum.to_dict("records"),
               "trained": result.trained, "missing": result.missing, "failed": _failed(result), "wall_s": result.wall_s, "baseline": result.baseline}
    atomic_write(out / "summary.json", json.dumps(summary, indent=1, default=float))


def _failed(result: ReproduceResult) -> list[dict]:
    """The failed cells: ``cell``, ``job_id``, ``log`` and the last lines of its ``error``."""
    failed = result.cells.failed if result.cells else []
    return [{"cell": s.cell.key, "job_id": s.job_id, "log": s.log, "error": s.error} for s in failed]


__all__ = ["PAPER_FIT", "SCALES", "ReproduceResult", "Scale", "fit_power_law", "reproduce", "reproduce_cells"]
