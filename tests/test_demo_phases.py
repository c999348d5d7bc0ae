"""The demo preset shows Zucchet et al.'s three phases: drop to the baseline, plateau, knowledge emergence."""

from __future__ import annotations

import pytest

from factlens.bios.trainer import TrainConfig, train


def phases(history) -> dict:
    ev, base = history.evals, history.baseline
    band = ev[(ev["attr_loss"] < 1.15 * base) & (ev["attr_loss"] > 0.85 * base)]
    return {"start": ev["attr_loss"].iloc[0], "band_steps": band["step"].tolist(),
            "band_acc": band["attr_acc"].max() if len(band) else None,
            "final_loss": ev["attr_loss"].iloc[-1], "final_acc": ev["attr_acc"].iloc[-1], "base": base}


def test_three_phases_quick(tmp_path):
    """A half-length demo (200 people, 500 steps; about a minute on 2 CPU cores)."""
    config = TrainConfig.preset("demo", n_people=200, steps=500, n_eval_sequences=128, n_unseen=0,
                                checkpoint_every=25, resume_every=10**6)
    p = phases(train(config, tmp_path, progress=False))
    assert p["start"] > 2 * p["base"]                           # 1. starts far above the no-knowledge loss ...
    assert p["band_steps"], "the loss never reached the no-knowledge baseline band"
    assert p["band_acc"] < 0.1                                  # 2. ... reaches it knowing (almost) nothing ...
    assert p["final_loss"] < 0.5 * p["base"] and p["final_acc"] > 0.4   # 3. ... then knowledge emerges


@pytest.mark.slow
def test_three_phases_demo_preset(tmp_path):
    """The README's main job: the full demo preset (about 2 minutes on 2 CPU cores)."""
    history = train(TrainConfig.preset("demo"), tmp_path, progress=False)
    p = phases(history)
    assert p["start"] > 2 * p["base"]
    assert len(p["band_steps"]) >= 2 and p["band_acc"] < 0.1    # a plateau: several checkpoints at the baseline
    assert p["final_loss"] < 0.2 * p["base"] and p["final_acc"] > 0.85
    assert history.evals["unseen_top_prob"].iloc[-1] > history.evals["unseen_top_prob"].iloc[4]  # hallucination
