"""Reproduction stages of Zucchet et al. §3 and the appendix, each a list of independent training cells.

A stage is two pure functions: ``cells(scale, root)`` → a list of :class:`~factlens.bios.cells.Cell` (key,
:class:`~factlens.bios.config.TrainConfig` and run folder of one run) and ``summary(cells, histories)`` → a table
and a plotly figure in the paper's layout. :func:`run_stage` hands the cells to the executor
(:func:`factlens.bios.executor.run_cells`: here, or as SLURM job arrays; a finished cell is read, not retrained;
patched cells start after their reference run), summarises the finished ones and writes ``<stage>.csv`` and
``<stage>.html``.

Stages (the paper's figure in brackets):

- ``curriculum`` (Fig. 4 right, J, I): uniform, the best power law α, the best celebrity and the best warm-up
  setting at equal compute, for at least two N; the warm-up's full-population loss beside uniform's.
- ``alpha_grid`` (Fig. 4 left, middle): plateau end over N × α; the α with the lowest final loss over N × steps.
- ``patching_grid`` (Fig. D): final loss over start × reference step of attention patching; the diagonal
  (start = reference) is attention frozen at that step.
- ``templates`` (Fig. A): 1, 2, 4, 8, 16 training templates per person, and 16 in a fixed sentence order.
- ``robustness`` (Fig. C): final loss over learning rate, weight decay and batch size (steps × batch fixed),
  with the three phases read in every cell.

Example:
    >>> from factlens.bios.stages import stage_cells
    >>> [c.key for c in stage_cells("templates", "tiny", "runs/stages")]
    ['templates/k1', 'templates/k2', 'templates/k4', 'templates/k8', 'templates/k16', 'templates/k16_fixed']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from factlens.bios.cells import Cell
from factlens.bios.config import TrainConfig
from factlens.bios.executor import CellsReport, CellStatus, ExecutorConfig, run_cells
from factlens.bios.history import TrainingHistory
from factlens.bios.patching.config import PatchConfig
from factlens.bios.phases import three_phases
from factlens.display import ResultDisplay
from factlens.errors import ConfigError
from factlens.storage import atomic_write


@dataclass(frozen=True)
class StageScale:
    """The grids of every stage at one scale (``tiny``: seconds, for tests; ``cpu``; ``gpu``: the paper's)."""

    preset: str
    overrides: dict
    curriculum_people: tuple[int, ...]
    alphas: tuple[float, ...]
    celebrities: tuple[tuple[float, float], ...]  # (fraction of N that are celebrities, weight)
    warmups: tuple[tuple[float, float], ...]  # (fraction of N in the warm-up subset, epochs)
    grid_people: tuple[int, ...]
    grid_alphas: tuple[float, ...]
    grid_steps: tuple[int, ...]
    patch_people: int
    patch_steps: tuple[int, ...]
    template_people: int
    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    robust_people: int
    curriculum_steps: int | None = None  # None: the preset's schedule (likewise below)
    patch_run_steps: int | None = None
    template_steps: int | None = None
    robust_steps: int | None = None

    def config(self, n_people: int, **extra) -> TrainConfig:
        return TrainConfig.preset(self.preset, **{**self.overrides, "n_people": n_people, **extra})


_TINY_POOLS = dict(first_names=20, last_names=20, cities=10, universities=10, majors=10, companies=10, years=2)
SCALES: dict[str, StageScale] = {
    "tiny": StageScale(
        preset="tiny", overrides=dict(steps=12, checkpoint_every=3, n_eval_sequences=16, n_unseen=0, resume_every=6,
                                      pools=_TINY_POOLS),
        curriculum_people=(32, 64), alphas=(0.6,), celebrities=((0.25, 4),), warmups=((0.25, 1),),
        grid_people=(32, 64), grid_alphas=(0.0, 0.6), grid_steps=(6, 12), patch_people=32, patch_steps=(0, 6),
        template_people=32, lrs=(1e-3, 2e-3), weight_decays=(0.1, 0.3), batch_sizes=(4, 8), robust_people=32),
    # The demo recipe (2 layers x 4 heads x d_model 128, batch 32, cosine 2e-3 -> 4e-4). Each stage is about
    # 7,000-14,000 training steps: 8-17 min on 2 idle cores with --workers 2 (docs/reproduction.md has each
    # stage's measured wall time). Warm-up epochs are chosen so the warm-up spans about a third to two thirds of
    # the subset's own plateau (the plateau grows with N: about 100 steps for 80 people here), as the paper's
    # E = 1-8 does at 64k people; the paper's E would end the warm-up within 2-10 steps at this scale.
    "cpu": StageScale(
        preset="demo", overrides=dict(n_unseen=0),
        curriculum_people=(325, 650), alphas=(0.6, 0.8), celebrities=((0.125, 8),),
        warmups=((0.125, 16), (0.125, 32), (0.25, 16)), curriculum_steps=1000,
        grid_people=(80, 160, 320), grid_alphas=(0.0, 0.4, 0.6, 0.8), grid_steps=(300, 600),
        patch_people=200, patch_steps=(0, 100, 200, 600), patch_run_steps=600, template_people=400,
        template_steps=1200, lrs=(1e-3, 2e-3, 4e-3), weight_decays=(0.01, 0.1, 1.0), batch_sizes=(16, 32, 64),
        robust_people=325, robust_steps=900),
    # The paper's grids (Table 1 model, batch 128, 16k steps; App. B.2, E, G).
    "gpu": StageScale(
        preset="paper", overrides=dict(n_unseen=0),
        curriculum_people=(16_000, 32_000, 64_000, 128_000, 256_000), alphas=(0.2, 0.4, 0.6, 0.8, 1.0),
        celebrities=tuple((f, w) for f in (1 / 16, 1 / 4) for w in (2, 4, 8, 16)),
        warmups=tuple((f, e) for f in (1 / 32, 1 / 16, 1 / 8, 1 / 4) for e in (1, 2, 3, 4, 8)),
        grid_people=(16_000, 32_000, 64_000, 128_000, 256_000), grid_alphas=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
        grid_steps=(8_000, 16_000, 32_000), patch_people=64_000,
        patch_steps=(0, 500, 1000, 2000, 4000, 8000, 16_000), template_people=64_000,
        lrs=(1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3), weight_decays=(0.01, 0.03, 0.1, 0.3, 1.0),
        batch_sizes=(32, 64, 128, 256, 512), robust_people=64_000),
}


@dataclass
class StageResult(ResultDisplay):
    """A stage's table (one row per cell or per picked setting) and its figure.

    Attributes:
        stage: the stage name. table: the paper's numbers for it. figure: a plotly figure in the paper's layout.
        missing: cells not finished (their rows are absent).
    """

    stage: str
    table: pd.DataFrame
    figure: object = field(repr=False)
    missing: list[str] = field(default_factory=list)

    def to_dataframe(self) -> pd.DataFrame:
        return self.table.copy()

    def plot(self):
        return self.figure


def _scale(scale: str | StageScale) -> StageScale:
    if isinstance(scale, StageScale):
        return scale
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)} or pass a StageScale.")
    return SCALES[scale]


def _final(h: TrainingHistory) -> dict:
    return {"final_loss": float(h.final["attr_loss"]), "final_acc": float(h.final["attr_acc"])}


def _maker(root: str | Path) -> Callable[[str, TrainConfig], Cell]:
    root = Path(root).absolute()
    return lambda key, config: Cell(key, config, str(root / key))


# ------------------------------------------------------------------------------------------- curriculum
def _steps(steps: int | None) -> dict:
    return {} if steps is None else {"steps": steps}


def curriculum_cells(scale: str | StageScale, root: str | Path) -> list[Cell]:
    sc, out, cell = _scale(scale), [], _maker(root)
    sc = dataclasses.replace(sc, overrides={**sc.overrides, **_steps(sc.curriculum_steps)})
    for n in sc.curriculum_people:
        out.append(cell(f"curriculum/N{n}/uniform", sc.config(n)))
        out += [cell(f"curriculum/N{n}/alpha{a:g}", sc.config(n, sampler={"kind": "power_law", "alpha": a}))
                for a in sc.alphas]
        out += [cell(f"curriculum/N{n}/celeb{max(1, round(f * n))}_w{w:g}",
                     sc.config(n, sampler={"kind": "celebrities", "n_celebrities": max(1, round(f * n)), "weight": w}))
                for f, w in sc.celebrities]
        out += [cell(f"curriculum/N{n}/warmup{max(1, round(f * n))}_e{e:g}",
                     sc.config(n, sampler={"kind": "warmup", "n_warmup": max(1, round(f * n)), "epochs": e}))
                for f, e in sc.warmups]
    return out


def _kind(cell: Cell) -> str:
    return cell.config.sampler.get("kind", "uniform")


def curriculum_summary(cells: list[Cell], histories: dict[str, TrainingHistory]) -> tuple[pd.DataFrame, object]:
    """Best setting of each sampler class per N (lowest final loss), and the warm-up's full-population loss."""
    from plotly.subplots import make_subplots

    rows = [{"n_people": c.config.n_people, "sampler": _kind(c), "cell": c.key,
             "setting": {k: v for k, v in c.config.sampler.items() if k != "kind"},
             "plateau_end": histories[c.key].plateau_end(), **_final(histories[c.key])}
            for c in cells if c.key in histories]
    frame = pd.DataFrame(rows)
    best = (frame.sort_values("final_loss").groupby(["n_people", "sampler"], sort=False).head(1)
            .sort_values(["n_people", "sampler"]).reset_index(drop=True)) if len(frame) else frame
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Final attribute loss, best setting per class (Fig. 4 right)",
                                                        "Warm-up: loss on the whole population (Fig. I)"))
    for kind in best["sampler"].unique() if len(best) else []:
        part = best[best["sampler"] == kind]
        fig.add_bar(x=[f"N={n}" for n in part["n_people"]], y=part["final_loss"], name=kind, row=1, col=1)
    fig.update_yaxes(type="log", title_text="final attribute loss (nats)", row=1, col=1)
    if len(best):
        n = int(best["n_people"].max())
        for kind in ("uniform", "warmup"):
            pick = best[(best["n_people"] == n) & (best["sampler"] == kind)]
            if len(pick):
                ev = histories[pick["cell"].iloc[0]].evals
                fig.add_scatter(x=ev["step"], y=ev["attr_loss"], mode="lines", name=f"{kind}, N={n}", row=1, col=2)
        base = next(iter(histories.values())).baseline
        fig.add_hline(y=base, line_dash="dot", annotation_text="no knowledge", row=1, col=2)
    fig.update_xaxes(title_text="training step", row=1, col=2)
    fig.update_layout(template="plotly_white", barmode="group", height=420, width=1300)
    return best, fig


# ------------------------------------------------------------------------------------------- alpha grid
def alpha_grid_cells(scale: str | StageScale, root: str | Path) -> list[Cell]:
    sc, cell = _scale(scale), _maker(root)
    return [cell(f"alpha_grid/N{n}_a{a:g}_s{s}",
                 sc.config(n, steps=s, sampler={"kind": "power_law", "alpha": a} if a else {"kind": "uniform"}))
            for n in sc.grid_people for a in sc.grid_alphas for s in sc.grid_steps]


def alpha_grid_summary(cells: list[Cell], histories: dict[str, TrainingHistory]) -> tuple[pd.DataFrame, object]:
    """One row per cell; heat-maps of the plateau end (N × α, longest schedule) and the best α (N × steps)."""
    from plotly.subplots import make_subplots

    rows = [{"n_people": c.config.n_people, "alpha": float(c.config.sampler.get("alpha", 0.0)),
             "steps": c.config.steps, "plateau_end": histories[c.key].plateau_end(), **_final(histories[c.key])}
            for c in cells if c.key in histories]
    frame = pd.DataFrame(rows)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Plateau end (steps) over N × α (Fig. 4 left)",
                                                        "α with the lowest final loss over N × steps (Fig. 4 middle)"))
    if len(frame):
        longest = frame[frame["steps"] == frame["steps"].max()]
        plateau = longest.pivot_table(index="n_people", columns="alpha", values="plateau_end")
        fig.add_heatmap(z=plateau.to_numpy(), x=[f"{a:g}" for a in plateau.columns], y=[str(n) for n in plateau.index],
                        colorscale="Viridis", texttemplate="%{z}", colorbar=dict(x=0.45), row=1, col=1)
        best = frame.loc[frame.groupby(["n_people", "steps"])["final_loss"].idxmin()]
        grid = best.pivot_table(index="n_people", columns="steps", values="alpha")
        fig.add_heatmap(z=grid.to_numpy(), x=[str(s) for s in grid.columns], y=[str(n) for n in grid.index],
                        colorscale="Blues", texttemplate="%{z}", row=1, col=2)
    fig.update_xaxes(title_text="α", row=1, col=1)
    fig.update_xaxes(title_text="training steps", row=1, col=2)
    fig.update_yaxes(title_text="N (people)", row=1, col=1)
    fig.update_layout(template="plotly_white", height=420, width=1200)
    return frame, fig


# ------------------------------------------------------------------------------------------- patching grid
def patching_grid_cells(scale: str | StageScale, root: str | Path) -> list[Cell]:
    """The reference run, then one patched run per (start, reference) step (a patched cell names its reference
    by absolute path)."""
    sc, cell = _scale(scale), _maker(root)
    base = sc.config(sc.patch_people, **_steps(sc.patch_run_steps))
    steps = [s for s in sc.patch_steps if s in base.checkpoint_steps()]
    if len(steps) != len(sc.patch_steps):
        raise ConfigError(f"patch steps {sorted(set(sc.patch_steps) - set(steps))} are not checkpoint steps of the "
                          f"reference; pick steps of its schedule {base.checkpoint_steps()[:8]}...")
    ref_dir = Path(root).absolute() / "patching_grid" / "reference"
    out = [cell("patching_grid/reference", base)]
    for start in steps:
        for ref in steps:
            if start >= base.steps or (start == ref == base.steps):
                continue  # patching from the last step changes nothing
            patch = PatchConfig(reference=str(ref_dir), reference_step=ref, start_patching=start)
            out.append(cell(f"patching_grid/start{start}_ref{ref}", dataclasses.replace(base, patch=patch)))
    return out


def patching_grid_summary(cells: list[Cell], histories: dict[str, TrainingHistory]) -> tuple[pd.DataFrame, object]:
    """Final loss over start (rows) × reference step (columns); the diagonal is frozen attention."""
    import plotly.graph_objects as go

    rows = [{"start_patching": c.config.patch.start_patching, "reference_step": c.config.patch.reference_step,
             "frozen": c.config.patch.start_patching == c.config.patch.reference_step, **_final(histories[c.key])}
            for c in cells if c.config.patch is not None and c.key in histories]
    frame = pd.DataFrame(rows)
    fig = go.Figure()
    if len(frame):
        grid = frame.pivot_table(index="start_patching", columns="reference_step", values="final_loss")
        fig.add_heatmap(z=grid.to_numpy(), x=[str(s) for s in grid.columns], y=[str(s) for s in grid.index],
                        colorscale="Viridis", texttemplate="%{z:.3g}", colorbar=dict(title="final loss"))
    ref = histories.get("patching_grid/reference")
    note = f" (unpatched: {float(ref.final['attr_loss']):.3g})" if ref is not None else ""
    fig.update_layout(title=f"Final attribute loss over start × reference step (Fig. D); diagonal = frozen{note}",
                      xaxis_title="reference step", yaxis_title="start patching at step", template="plotly_white",
                      height=480, width=640)
    return frame, fig


# ------------------------------------------------------------------------------------------- templates
TEMPLATE_COUNTS = (1, 2, 4, 8, 16)


def templates_cells(scale: str | StageScale, root: str | Path) -> list[Cell]:
    sc, cell = _scale(scale), _maker(root)
    steps = _steps(sc.template_steps)
    out = [cell(f"templates/k{k}", sc.config(sc.template_people, n_train_templates=k, **steps))
           for k in TEMPLATE_COUNTS]
    out.append(cell("templates/k16_fixed", sc.config(sc.template_people, n_train_templates=16,
                                                     sentence_order="fixed", **steps)))
    return out


def templates_summary(cells: list[Cell], histories: dict[str, TrainingHistory]) -> tuple[pd.DataFrame, object]:
    """Final loss per template count and order, with the no-knowledge baseline (Fig. A)."""
    import plotly.graph_objects as go

    rows = [{"templates": c.config.n_train_templates, "sentence_order": c.config.sentence_order,
             "baseline": histories[c.key].baseline, **_final(histories[c.key])}
            for c in cells if c.key in histories]
    frame = pd.DataFrame(rows)
    fig = go.Figure()
    if len(frame):
        labels = [f"{t}{' fixed order' if o == 'fixed' else ''}" for t, o in zip(frame["templates"],
                                                                                frame["sentence_order"], strict=True)]
        fig.add_bar(x=labels, y=frame["final_loss"], name="final attribute loss")
        fig.add_hline(y=float(frame["baseline"].iloc[0]), line_dash="dot", annotation_text="no knowledge")
    fig.update_layout(title="Final attribute loss over training templates per person (Fig. A)",
                      xaxis_title="training templates per person", yaxis_title="final attribute loss (nats)",
                      yaxis_type="log", template="plotly_white", height=420, width=700)
    return frame, fig


# ------------------------------------------------------------------------------------------- robustness
def robustness_cells(scale: str | StageScale, root: str | Path) -> list[Cell]:
    """One knob at a time around the scale's recipe; batch sizes keep steps × batch (the data) fixed."""
    sc = _scale(scale)
    sc = dataclasses.replace(sc, overrides={**sc.overrides, **_steps(sc.robust_steps)})
    base, cell = sc.config(sc.robust_people), _maker(root)
    out = [cell(f"robustness/lr{lr:g}", sc.config(sc.robust_people, lr=lr, min_lr=min(base.min_lr, lr)))
           for lr in sc.lrs]
    out += [cell(f"robustness/wd{wd:g}", sc.config(sc.robust_people, weight_decay=wd)) for wd in sc.weight_decays]
    data = base.steps * base.batch_size
    out += [cell(f"robustness/batch{b}", sc.config(sc.robust_people, batch_size=b, steps=data // b,
                                                   checkpoint_every=max(1, (base.checkpoint_every or 1)
                                                                        * base.batch_size // b)))
            for b in sc.batch_sizes]
    return out


def robustness_summary(cells: list[Cell], histories: dict[str, TrainingHistory]) -> tuple[pd.DataFrame, object]:
    """Final loss per knob value, and whether the three phases appear (band reading) in each cell."""
    from plotly.subplots import make_subplots

    rows = []
    for c in cells:
        if c.key not in histories:
            continue
        knob = c.key.split("/")[-1]
        kind = "batch_size" if knob.startswith("batch") else "weight_decay" if knob.startswith("wd") else "lr"
        value = {"lr": c.config.lr, "weight_decay": c.config.weight_decay, "batch_size": c.config.batch_size}[kind]
        phases = three_phases(histories[c.key])
        has_three = phases["plateau_end"] is not None and phases["drop_end"] is not None and (
            float(histories[c.key].final["attr_loss"]) < histories[c.key].baseline * 0.97)
        rows.append({"knob": kind, "value": value, **_final(histories[c.key]), "drop_end": phases["drop_end"],
                     "plateau_end": phases["plateau_end"], "three_phases": bool(has_three)})
    frame = pd.DataFrame(rows)
    knobs = ("lr", "weight_decay", "batch_size")
    fig = make_subplots(rows=1, cols=3, subplot_titles=("learning rate", "weight decay", "batch size (data fixed)"))
    for i, knob in enumerate(knobs, start=1):
        part = frame[frame["knob"] == knob] if len(frame) else frame
        if len(part):
            fig.add_scatter(x=part["value"], y=part["final_loss"], mode="lines+markers", name=knob, row=1, col=i)
        fig.update_xaxes(type="log", title_text=knob, row=1, col=i)
        fig.update_yaxes(type="log", row=1, col=i)
    fig.update_yaxes(title_text="final attribute loss (nats)", row=1, col=1)
    fig.update_layout(title="Robustness of the final loss (Fig. C)", template="plotly_white", height=400, width=1200,
                      showlegend=False)
    return frame, fig


# ------------------------------------------------------------------------------------------- running
@dataclass(frozen=True)
class Stage:
    """A stage: its cells at a scale and its summary of the finished cells' histories."""

    name: str
    cells: Callable[..., list[Cell]]
    summary: Callable[[list[Cell], dict[str, TrainingHistory]], tuple[pd.DataFrame, object]]


STAGES: dict[str, Stage] = {
    "curriculum": Stage("curriculum", curriculum_cells, curriculum_summary),
    "alpha_grid": Stage("alpha_grid", alpha_grid_cells, alpha_grid_summary),
    "patching_grid": Stage("patching_grid", patching_grid_cells, patching_grid_summary),
    "templates": Stage("templates", templates_cells, templates_summary),
    "robustness": Stage("robustness", robustness_cells, robustness_summary),
}


def scale_with(scale: str | StageScale, overrides: dict) -> StageScale:
    """``scale`` with ``overrides`` applied to every cell's config (``model`` merged into the preset's), as the
    robustness options of ``factlens bios reproduce`` (weight decay, AdamW betas, model size) do.

    Example:
        >>> from factlens.bios.stages import scale_with
        >>> scale_with("tiny", {"model": {"n_layer": 1}}).config(16).model["n_layer"]
        1
    """
    sc = _scale(scale)
    merged = {**sc.overrides, **overrides}
    if "model" in overrides:
        merged["model"] = {**sc.overrides.get("model", {}), **overrides["model"]}
    out = dataclasses.replace(sc, overrides=merged)
    out.config(out.template_people)  # refuses a bad value before anything trains
    return out


def stage_cells(stage: str, scale: str | StageScale, root: str | Path) -> list[Cell]:
    """The cells of ``stage`` at ``scale``, with run folders under ``root``."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {sorted(STAGES)}.")
    return STAGES[stage].cells(scale, root)


def run_stage(stage: str, scale: str | StageScale, root: str | Path, *, executor: ExecutorConfig | None = None,
              wait: bool = True, device=None, progress: bool = True, train_missing: bool = True,
              write_png: bool = False) -> StageResult:
    """Run (or resume, or submit) a stage's cells under ``root`` and write ``root/<stage>.csv`` and
    ``root/<stage>.html`` from the finished ones (and ``root/<stage>.png`` with ``write_png``: it needs the
    ``png`` extra and a Chrome or Chromium, and raises :class:`~factlens.errors.MissingDependencyError` naming
    them when this machine lacks them).

    Cells that patch attention from a reference run start after it (on SLURM: after its job). ``executor``,
    ``wait``: as :func:`factlens.bios.executor.run_cells`; ``train_missing=False`` starts nothing.

    Example:
        >>> result = run_stage("templates", "tiny", "runs/stages", progress=False)  # doctest: +SKIP
        >>> result.table                                                           # doctest: +SKIP
    """
    cells = stage_cells(stage, scale, root)
    root = Path(root)
    run = dict(executor=executor, jobs_dir=root / "jobs", wait=wait, submit=train_missing, device=device,
               progress=progress)
    plain = [c for c in cells if c.config.patch is None]
    patched = [c for c in cells if c.config.patch is not None]
    report = run_cells(plain, **run)
    if patched:
        refs = {s.cell.run_dir: s for s in report.statuses}
        ref = refs.get(str(Path(patched[0].config.patch.reference)))
        if ref is not None and ref.state == "finished":
            second = run_cells(patched, **run)
        elif ref is not None and ref.state in ("pending", "running") and ref.job_id:
            second = run_cells(patched, **run, after=[ref.job_id])
        else:
            second = CellsReport([CellStatus(c, "not started", error="waits for its reference run") for c in patched])
        report = CellsReport(report.statuses + second.statuses, report.submitted + second.submitted)
    done = report.finished
    histories = {s.cell.key: s.cell.history() for s in report.statuses if s.cell.key in done}
    table, fig = STAGES[stage].summary(cells, histories)
    atomic_write(root / f"{stage}.csv", table.to_csv(index=False))
    atomic_write(root / f"{stage}.html", fig.to_html())
    if write_png:
        from factlens.figures import write_png as png

        png(fig, root / f"{stage}.png", scale=1.5)
    return StageResult(stage, table, fig, missing=[c.key for c in cells if c.key not in histories])


def training_flops(cells: list[Cell]) -> float:
    """Upper bound on the training FLOPs of ``cells``: 6 × parameters × steps × batch × sequence length (padding
    counted; evaluation not counted). Divide by a GPU's sustained FLOP/s for its time.

    Example:
        >>> from factlens.bios.stages import stage_cells, training_flops
        >>> training_flops(stage_cells("templates", "tiny", "runs/stages")) > 0
        True
    """
    from factlens.bios.data.vocab import BiosVocab

    total = 0.0
    for cell in cells:
        cfg = cell.config
        m = cfg.model
        vocab = BiosVocab(cfg.make_pools())
        seq = cfg.seq_len or 8 * math.ceil(vocab.max_biography_tokens() / 8)
        d, layers = m["n_embd"], m["n_layer"]
        params = layers * (4 * d * d + 2 * d * m.get("n_inner", 4 * d)) + vocab.size * d
        total += 6.0 * params * cfg.steps * cfg.batch_size * seq
    return total


__all__ = ["SCALES", "STAGES", "Stage", "StageResult", "StageScale", "run_stage", "scale_with", "stage_cells",
           "training_flops"]
