"""A run is identified by content, not by names or paths: Run, the one reader of a run folder, checks it.

Renamed or swapped checkpoint folders, a cell folder holding another cell's run (or a run of another
schedule), people rebuilt differently from the ones trained on, fine-tuning "old" people the model never saw,
a relative reference path and a reference whose weights changed: each is refused with a factlens error naming
the fix. The numbers Run.evaluate computes are the ones the trainer logged (the golden reference), and a
20-step run's metrics log matches the one recorded before the run folder had a reader of its own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factlens.bios.cells import Cell
from factlens.bios.config import TrainConfig
from factlens.bios.data.population import Population
from factlens.bios.executor import run_cells
from factlens.bios.finetune import finetune_config
from factlens.bios.patching.config import PatchConfig
from factlens.bios.run import POPULATION, Run, pin_reference, reference_checkpoint
from factlens.bios.task import BiosTask
from factlens.bios.trainer import train
from factlens.checkpoints import load_checkpoint, step_dir
from factlens.errors import CheckpointError, ConfigError

POOLS = dict(first_names=20, last_names=20, cities=10, universities=6, majors=5, companies=6, years=10)
TIMING = ("tokens_per_s", "rss_gib", "peak_rss_gib", "threads")  # how the run ran, not what it computed
HERE = Path(__file__).parent


def cfg(**overrides) -> TrainConfig:
    base = dict(steps=6, n_people=16, batch_size=4, n_eval_sequences=8, n_unseen=4, checkpoint_every=3,
                log_every=2, resume_every=3, keep_resume=1, pools=POOLS, eval_batch_size=8)
    return TrainConfig.preset("tiny", **{**base, **overrides})


OTHER_PEOPLE = Population.generate(16, seed=7, pools=cfg().make_pools())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Finished tiny runs: a base run, one of another seed, one of another schedule, one on explicit people,
    and one patched from the base run."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, config, kw in [("base", cfg(), {}), ("seed", cfg(seed=1), {}), ("schedule", cfg(steps=9), {}),
                             ("people", cfg(), {"population": OTHER_PEOPLE})]:
        train(config, root / name, progress=False, **kw)
        out[name] = root / name
    patch = PatchConfig(reference=str(out["base"]), reference_step=3, start_patching=0)
    train(cfg(patch=patch), root / "patched", progress=False)
    out["patched"] = root / "patched"
    return out


def _copy(src: Path, tmp: Path, name: str = "run") -> Path:
    dst = tmp / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------ checkpoints by step
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_renamed_or_swapped_checkpoint_folder_is_refused(runs, tmp_path, data):
    run_dir = _copy(runs["base"], tmp_path)
    root = run_dir / "checkpoints"
    steps = Run(run_dir).steps  # [0, 3, 6]
    perm = data.draw(st.permutations(steps).filter(lambda p: list(p) != steps), label="new names")
    for s in steps:
        os.replace(step_dir(root, s), root / f"tmp_{s}")
    for old, new in zip(steps, perm):
        os.replace(root / f"tmp_{old}", step_dir(root, new))
    moved = [new for old, new in zip(steps, perm) if old != new]
    with pytest.raises(CheckpointError, match="renamed or copied over another"):
        _ = Run(run_dir).config
    with pytest.raises(CheckpointError, match=r"Rename it back to step_\d{7}"):
        load_checkpoint(step_dir(root, moved[0]))


def test_a_checkpoint_renamed_to_a_later_step_is_refused(runs, tmp_path):
    run_dir = _copy(runs["base"], tmp_path)
    os.replace(step_dir(run_dir / "checkpoints", 6), run_dir / "spare")
    os.replace(step_dir(run_dir / "checkpoints", 3), step_dir(run_dir / "checkpoints", 6))
    with pytest.raises(CheckpointError, match="holds the checkpoint of step 3, not of step 6"):
        Run(run_dir).checkpoint(6)


# ------------------------------------------------------------------------------------------ cells by content
CELLS = {"base": cfg(), "seed": cfg(seed=1), "schedule": cfg(steps=9)}


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pair=st.permutations(sorted(CELLS)).map(lambda p: p[:2]))
def test_a_cell_holding_another_cells_run_is_refused_not_read_as_finished(runs, tmp_path, pair):
    mine, theirs = pair
    cell = _copy(runs[theirs], tmp_path, "cell")  # another cell's finished run, copied into this cell's folder
    with pytest.raises(CheckpointError, match="holds a run with another config"):
        Run(cell).finished(CELLS[mine])
    with pytest.raises(CheckpointError, match="another config"):
        run_cells([Cell("cell", CELLS[mine], str(cell))], jobs_dir=tmp_path / "jobs", submit=False, progress=False)
    assert Run(_copy(runs[mine], tmp_path, "own")).finished(CELLS[mine])


# ------------------------------------------------------------------------------------------ people by content
def test_a_run_on_explicit_people_stores_them_and_readers_check_them(runs, tmp_path):
    run = Run(runs["people"])
    assert (run.path / POPULATION).exists()
    assert run.population().equals(OTHER_PEOPLE)
    assert run.evaluate(6) == pytest.approx({k: v for k, v in run.history.final.items() if k != "step"})

    lost = _copy(runs["people"], tmp_path, "lost")
    (lost / POPULATION).unlink()
    with pytest.raises(CheckpointError, match=r"population\.npz is missing: restore it"):
        Run(lost).population()
    swapped = _copy(runs["people"], tmp_path, "swapped")
    Population.generate(16, seed=8, pools=cfg().make_pools()).save(swapped / POPULATION)
    with pytest.raises(CheckpointError, match="not the ones it was trained on"):
        Run(swapped).population()
    assert not (runs["base"] / POPULATION).exists()  # a run on its config's own people stores nothing extra


def test_resuming_with_other_people_is_refused(runs, tmp_path):
    run_dir = _copy(runs["base"], tmp_path)
    with pytest.raises(CheckpointError, match="trained on other people"):
        train(cfg(), run_dir, progress=False, population=OTHER_PEOPLE)


def test_finetuning_old_people_are_the_runs_own(runs):
    with pytest.raises(ConfigError, match="Drop data_seed"):
        finetune_config(runs["base"], data_seed=5, n_new=4, steps=2)
    config = finetune_config(runs["people"], n_new=4, steps=2)
    assert config.finetune.population_sha256 == OTHER_PEOPLE.fingerprint()
    with pytest.raises(ConfigError, match="measured as old although the model never saw them"):
        BiosTask.build(config)  # the config's own people are not the ones the run was trained on
    task = BiosTask.build(config, Run(runs["people"]).population())
    assert len(task.population) == 16 + 4


# ------------------------------------------------------------------------------------------ references
def test_a_relative_reference_is_made_absolute_when_the_config_is_built(runs, monkeypatch):
    monkeypatch.chdir(runs["base"].parent)
    patch = PatchConfig(reference="base", reference_step=3)
    assert patch.reference == str(runs["base"])
    monkeypatch.chdir(runs["base"])  # read from elsewhere: the same folder
    assert reference_checkpoint(patch) == step_dir(runs["base"] / "checkpoints", 3)
    stored = Run(runs["patched"]).config.patch
    assert Path(stored.reference).is_absolute() and stored.reference_sha256 is not None


def test_a_reference_whose_weights_changed_is_refused(runs, tmp_path):
    reference = _copy(runs["base"], tmp_path, "reference")
    config = pin_reference(cfg(patch=PatchConfig(reference=str(reference), reference_step=3)))
    assert reference_checkpoint(config.patch) == step_dir(reference / "checkpoints", 3)
    shutil.rmtree(reference)
    shutil.copytree(runs["seed"], reference)  # another run (same schedule) in the reference's place
    with pytest.raises(CheckpointError, match="not the one this run was configured with"):
        reference_checkpoint(config.patch)
    with pytest.raises(CheckpointError, match="not the one this run was configured with"):
        train(config, tmp_path / "patched", progress=False)
    assert not (tmp_path / "patched").exists()  # refused before anything was written


def test_a_patched_run_written_before_references_were_pinned_still_reads_as_finished(runs, tmp_path):
    legacy = _copy(runs["patched"], tmp_path, "legacy")
    for path in [legacy / "config.json", *legacy.glob("*/step_*/manifest.json")]:
        data = json.loads(path.read_text())
        (data.get("config", data))["patch"]["reference_sha256"] = None
        path.write_text(json.dumps(data))
    config = pin_reference(cfg(patch=PatchConfig(reference=str(runs["base"]), reference_step=3, start_patching=0)))
    assert Run(legacy).finished(config)
    other = pin_reference(cfg(patch=PatchConfig(reference=str(runs["base"]), reference_step=6, start_patching=0)))
    with pytest.raises(CheckpointError, match="another config"):
        Run(legacy).finished(other)


# ------------------------------------------------------------------------------------------ Run reads
@pytest.mark.parametrize("name", ["base", "patched"])
def test_evaluate_reproduces_the_logged_evaluations_without_a_trainer(runs, name, monkeypatch):
    import factlens.bios.trainer as trainer

    monkeypatch.setattr(trainer, "Trainer", None)  # no trainer (and no memory probe) is built
    run = Run(runs[name])
    logged = {int(r["step"]): r for r in run.history.evals.to_dict("records")}
    for step in run.steps:
        got = run.evaluate(step)
        want = {k: v for k, v in logged[step].items() if k != "step"}
        assert got.keys() == want.keys()
        assert all(math.isclose(got[k], want[k], rel_tol=1e-5, abs_tol=1e-6) for k in want), (step, got, want)


def test_bios_eval_prints_the_logged_evaluation(runs, capsys):
    from factlens.cli import main

    assert main(["bios", "eval", "--run", str(runs["patched"]), "--step", "3", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    logged = next(r for r in Run(runs["patched"]).history.evals.to_dict("records") if r["step"] == 3)
    assert printed.keys() == logged.keys() and printed["step"] == 3
    assert all(math.isclose(printed[k], logged[k], rel_tol=1e-5, abs_tol=1e-6) for k in logged)


def test_run_reads_the_folder_once(runs):
    run = Run(runs["base"])
    assert run.steps == [0, 3, 6] and run.config == cfg()
    assert run.checkpoint().step == 6 and run.checkpoint(3).step == 3
    assert run.history.final["step"] == 6
    assert set(run.phases()) >= {"drop_end", "plateau_end", "plateau_steps"}
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 4; available: \[0, 3, 6\]"):
        run.checkpoint(4)


def test_a_tiny_runs_metrics_log_is_unchanged():
    """A 20-step tiny run logs the rows (timing, memory and thread columns aside) recorded for it in tests/data."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        train(TrainConfig.preset("tiny", steps=20), out, device="cpu", progress=False)
        got = [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(ln) for ln in (HERE / "data" / "tiny20_metrics.jsonl").read_text().splitlines()]
    got = [{k: v for k, v in r.items() if k not in TIMING} for r in got]
    assert [(r["kind"], r["step"], sorted(r)) for r in got] == [(r["kind"], r["step"], sorted(r)) for r in want]
    for g, w in zip(got, want):
        assert all(math.isclose(g[k], w[k], rel_tol=1e-6, abs_tol=1e-9) for k in w if k not in ("kind", "step")), (g, w)


def test_fine_tuning_config_is_typed(runs):
    config = finetune_config(runs["base"], n_new=4, steps=2)
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and dataclasses.is_dataclass(again.finetune)
