"""scripts/forgetting_lr.py: the forgetting cells at another fine-tuning LR, on the tiny scale."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from factlens.bios.run import Run

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "forgetting_lr.py"


@pytest.mark.slow  # a pre-training run and two fine-tuning cells (6-7 s): .ci/run runs it in its slow step
def test_forgetting_lr_fine_tunes_at_the_given_lr_and_prints_the_table(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("forgetting_lr", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "lr"
    assert script.main(["--scale", "tiny", "--lr", "2e-4", "--steps", "4", "--every", "2", "--sizes", "4", "8",
                        "--workers", "1", "--out", str(out)]) == 0
    for k in (4, 8):
        config = Run(out / "finetune" / f"new{k}_w0").config
        assert (config.lr, config.min_lr, config.steps, config.checkpoint_every) == (2e-4, 2e-4, 4, 2)
        assert config.finetune.n_new == k and config.finetune.old_weight == 0 and not config.finetune.keep_optimizer
    assert sorted(p.name for p in (out / "finetune").iterdir()) == ["new4_w0", "new8_w0"]
    printed = capsys.readouterr().out
    assert "LR 0.0002" in printed and "new_acc_half_step" in printed
    table = printed.split("report ")[1].splitlines()[1:]
    assert table[0].split()[:2] == ["new_people", "new_fraction"] and [ln.split()[0] for ln in table[1:]] == ["4", "8"]
