"""Long commands say what they will do, how long (from a measured step) and where, before they start; the
measurement leaves the run as an uninterrupted one; --keep-checkpoints last keeps what the figure needs."""

from __future__ import annotations

import pytest
import torch

from factlens.bios.estimate import measure
from factlens.bios.trainer import TrainConfig, Trainer, train
from factlens.checkpoints import list_checkpoints, load_checkpoint, step_dir
from factlens.cli import main


def test_train_prints_its_plan_first_and_the_measurement_does_not_change_the_run(tmp_path, capsys):
    assert main(["bios", "train", "--preset", "tiny", "--out", str(tmp_path / "cli"), "--threads", "1"]) == 0
    out, _ = capsys.readouterr()
    first = out.splitlines()[:3]
    assert "30 steps" in first[0] and first[1].lstrip().startswith("time:  about")
    assert "measured" in first[1] and str(tmp_path / "cli") in first[2]
    train(TrainConfig.preset("tiny"), tmp_path / "plain", progress=False)  # the golden run: nothing measured
    for step in list_checkpoints(tmp_path / "plain" / "checkpoints"):
        a = load_checkpoint(step_dir(tmp_path / "cli" / "checkpoints", step)).state
        b = load_checkpoint(step_dir(tmp_path / "plain" / "checkpoints", step)).state
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step


@pytest.mark.slow  # a demo run kept to its last checkpoint (6-7 s): .ci/run runs it in its slow step
def test_keep_last_checkpoint_leaves_a_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["bios", "train", "--preset", "tiny", "--out", str(out), "--keep-checkpoints", "last",
                 "--quiet"]) == 0
    assert list_checkpoints(out / "checkpoints") == [30] and list_checkpoints(out / "resume") == [30]
    assert (out / "curves.html").exists()
    capsys.readouterr()
    assert main(["bios", "train", "--preset", "tiny", "--out", str(out), "--quiet"]) == 0  # finished: no retraining
    assert list_checkpoints(out / "checkpoints") == [30]


def test_measure_leaves_model_optimizer_and_rng_untouched(tmp_path):
    trainer = Trainer(TrainConfig.preset("tiny"), tmp_path, progress=False)
    weights = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    rng = torch.get_rng_state()
    est = measure(trainer)
    assert est.step_s > 0 and est.eval_s > 0 and est.evals == len(trainer.config.checkpoint_steps())
    assert all(torch.equal(weights[k], v) for k, v in trainer.raw_model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()) and not trainer.optimizer.state


def test_reproduce_prints_its_plan_counting_only_unfinished_runs(tmp_path, capsys):
    """``bios reproduce`` says how many runs it still trains (finished cells excluded), the measured time and
    where, before it starts; on a second call nothing is left to train."""
    from factlens.bios.estimate import estimate_configs
    from factlens.bios.stages import stage_cells

    args = ["bios", "reproduce", "--scale", "tiny", "--stages", "templates", "--out", str(tmp_path), "--no-png",
            "--threads", "1"]
    assert main(args) == 0
    first = capsys.readouterr().out.splitlines()
    assert "stages templates; 6 of 6 training runs still to train" in first[0] and "SMOKE RUN" in first[0]
    assert first[1].lstrip().startswith("time:  about") and f"{6 * 12:,} steps" in first[1]
    assert str(tmp_path) in first[2]
    assert main(args) == 0
    assert "0 of 6 training runs still to train" in capsys.readouterr().out.splitlines()[0]
    configs = [c.config for c in stage_cells("templates", "tiny", tmp_path)]
    one, two = estimate_configs(configs), estimate_configs(configs, workers=2)
    assert one.steps == two.steps == 72 and one.evals == sum(len(c.checkpoint_steps()) for c in configs)
    assert two.total_s < one.total_s  # two workers share the runs


def test_capitals_analyze_prints_what_how_long_and_where_before_it_starts(tmp_path, capsys):
    from factlens.recall.report import ANALYSIS_PASSES

    out = tmp_path / "an"
    assert main(["capitals", "analyze", "--model", "tiny-gpt2", "--out", str(out), "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("factlens capitals analyze: tiny-gpt2"))
    assert "path patching" in lines[head] and "mitigation table" in lines[head]
    assert lines[head + 1].lstrip().startswith("time:  about") and "forward pass of the prompts measured" in lines[head + 1]
    one_pass = float(lines[head + 1].split("measured: ")[1].split(" s")[0])
    assert one_pass > 0 and ANALYSIS_PASSES > 1
    assert str(out / "report.html") in lines[head + 2] and (out / "report.html").exists()
