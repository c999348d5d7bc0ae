"""Reproduction stages as lists of training cells: their grids, their summaries and one tiny run."""

from __future__ import annotations

import pandas as pd
import pytest

import factlens
from factlens.bios.cells import Cell
from factlens.bios.executor import run_cells
from factlens.bios.stages import SCALES, STAGES, run_stage, stage_cells, training_flops


@pytest.mark.parametrize("scale", ["tiny", "cpu", "gpu"])
def test_curriculum_compares_four_classes_at_equal_compute_for_two_populations(scale, tmp_path):
    cells = stage_cells("curriculum", scale, tmp_path)
    people = {c.config.n_people for c in cells}
    assert len(people) >= 2
    for n in people:
        mine = [c for c in cells if c.config.n_people == n]
        assert {c.config.sampler["kind"] for c in mine} == {"uniform", "power_law", "celebrities", "warmup"}
        assert len({(c.config.steps, c.config.batch_size) for c in mine}) == 1  # equal compute
        assert all(0 < c.config.sampler.get("n_warmup", 1) < n for c in mine)
    assert len({c.key for c in cells}) == len({c.run_dir for c in cells}) == len(cells)
    assert all(c.run_dir == str(tmp_path.absolute() / c.key) for c in cells)


def test_gpu_scale_is_the_papers_grid(tmp_path):
    gpu = SCALES["gpu"]
    cfg = gpu.config(64_000)
    assert (cfg.model["n_layer"], cfg.model["n_embd"], cfg.batch_size, cfg.steps) == (8, 512, 128, 16_000)
    assert gpu.grid_alphas == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) and gpu.grid_steps == (8_000, 16_000, 32_000)
    assert gpu.patch_steps == (0, 500, 1000, 2000, 4000, 8000, 16_000)
    assert gpu.lrs == (1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3) and gpu.weight_decays == (0.01, 0.03, 0.1, 0.3, 1.0)
    batches = [c for c in stage_cells("robustness", "gpu", tmp_path) if "batch" in c.key]
    assert {c.config.batch_size for c in batches} == {32, 64, 128, 256, 512}
    assert {c.config.batch_size * c.config.steps for c in batches} == {128 * 16_000}  # data fixed


@pytest.mark.parametrize("scale", ["tiny", "cpu", "gpu"])
def test_alpha_grid_patching_grid_templates_and_robustness_cells(scale, tmp_path):
    sc = SCALES[scale]
    grid = stage_cells("alpha_grid", scale, tmp_path)
    assert len(grid) == len(sc.grid_people) * len(sc.grid_alphas) * len(sc.grid_steps)
    patching = stage_cells("patching_grid", scale, tmp_path)
    assert patching[0].config.patch is None and all(c.config.patch is not None for c in patching[1:])
    pairs = {(c.config.patch.start_patching, c.config.patch.reference_step) for c in patching[1:]}
    assert {(s, s) for s in sc.patch_steps if s < patching[0].config.steps} <= pairs  # the frozen diagonal
    assert all(c.config.patch.reference == patching[0].run_dir for c in patching[1:])
    templates = stage_cells("templates", scale, tmp_path)
    assert [(c.config.n_train_templates, c.config.sentence_order) for c in templates] == [
        (1, "random"), (2, "random"), (4, "random"), (8, "random"), (16, "random"), (16, "fixed")]
    robust = stage_cells("robustness", scale, tmp_path)
    assert {c.config.lr for c in robust} >= set(sc.lrs)
    assert {c.config.weight_decay for c in robust} >= set(sc.weight_decays)
    assert training_flops(templates) > 0


def test_unknown_stages_scales_and_patch_steps_are_refused(tmp_path):
    with pytest.raises(factlens.ConfigError, match="unknown stage"):
        stage_cells("zipf", "tiny", tmp_path)
    with pytest.raises(factlens.ConfigError, match="unknown scale"):
        stage_cells("templates", "huge", tmp_path)
    with pytest.raises(factlens.ConfigError, match="not checkpoint steps"):
        stage_cells("patching_grid", SCALES["tiny"].__class__(**{**SCALES["tiny"].__dict__, "patch_steps": (0, 5)}),
                    tmp_path)


def test_templates_stage_writes_its_table_and_figure_and_resumes(tmp_path):
    result = run_stage("templates", "tiny", tmp_path, progress=False)
    assert not result.missing
    table = pd.read_csv(tmp_path / "templates.csv")
    assert list(table["templates"]) == [1, 2, 4, 8, 16, 16]
    assert list(table["sentence_order"]) == ["random"] * 5 + ["fixed"]
    assert (tmp_path / "templates.html").exists() and len(result.plot().data) == 1
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("templates/*/metrics.jsonl")}
    again = run_stage("templates", "tiny", tmp_path, progress=False, train_missing=False)
    assert again.table.equals(result.table)
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.glob("templates/*/metrics.jsonl")}
    # a cell folder holding another cell's run is refused
    cells = stage_cells("templates", "tiny", tmp_path)
    swapped = [Cell(c.key, other.config, c.run_dir) for c, other in zip(cells, cells[::-1], strict=True)]
    with pytest.raises(factlens.FactlensError):
        run_cells(swapped, jobs_dir=tmp_path / "jobs", progress=False)


@pytest.mark.slow  # every appendix stage's cells trained (9-14 s): .ci/run runs it in its slow step
def test_summaries_of_the_other_stages_on_tiny_runs(tmp_path):
    for stage in ("curriculum", "patching_grid", "robustness"):
        result = run_stage(stage, "tiny", tmp_path, progress=False)
        assert not result.missing and len(result.table) and (tmp_path / f"{stage}.html").exists()
    curriculum = pd.read_csv(tmp_path / "curriculum.csv")
    assert set(curriculum["sampler"]) == {"uniform", "power_law", "celebrities", "warmup"}
    assert len(curriculum) == 4 * len(SCALES["tiny"].curriculum_people)  # one best setting per class and N
    robustness = pd.read_csv(tmp_path / "robustness.csv")
    assert set(robustness["knob"]) == {"lr", "weight_decay", "batch_size"}
    assert set(STAGES) == {"curriculum", "alpha_grid", "patching_grid", "templates", "robustness"}


def test_cli_reproduce_runs_a_stage_with_robustness_options(tmp_path, capsys):
    from factlens.bios.run import Run
    from factlens.cli import main

    with pytest.raises(SystemExit):
        main(["bios", "reproduce", "--scale", "tiny", "--stages", "zipf", "--out", str(tmp_path), "--quiet"])
    assert not list(tmp_path.iterdir())
    assert main(["bios", "reproduce", "--scale", "tiny", "--stages", "templates", "--d-model", "30", "--n-heads", "4",
                 "--out", str(tmp_path), "--quiet"]) == 2
    assert not list(tmp_path.iterdir())
    assert main(["bios", "reproduce", "--scale", "tiny", "--stages", "templates", "--weight-decay", "0.3",
                 "--out", str(tmp_path), "--quiet"]) == 0
    assert "stage templates: 6 training runs" in capsys.readouterr().out
    assert Run(tmp_path / "templates" / "k1").config.weight_decay == 0.3
    assert (tmp_path / "templates.csv").exists()


def test_the_cli_offers_every_stage():
    from factlens.cli.bios import APPENDIX_STAGES

    assert tuple(STAGES) == APPENDIX_STAGES


@pytest.mark.slow
def test_a_stage_writes_its_png(tmp_path):
    import factlens.figures as figures

    if not figures.png_support()[0]:
        pytest.skip(figures.png_support()[1])
    run_stage("templates", "tiny", tmp_path, progress=False, write_png=True)
    assert (tmp_path / "templates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_stage_without_png_support_names_what_is_missing(tmp_path, monkeypatch):
    import factlens.figures as figures
    from factlens.errors import MissingDependencyError

    monkeypatch.setattr(figures, "png_support", lambda: (False, 'PNG export needs kaleido: pip install "factlens[png]"'))
    with pytest.raises(MissingDependencyError, match="kaleido"):
        run_stage("templates", "tiny", tmp_path, progress=False, write_png=True)
    assert (tmp_path / "templates.html").exists()  # the HTML figure is written first
