"""The phase rules of factlens.bios.phases, and the demo preset showing Zucchet et al.'s three phases.

The full demo (`factlens demo`) is the README's main job; the slow test below runs exactly its preset and
asserts the issue's criteria: the loss reaches the no-knowledge baseline, stays within ±3% of it for at least
as many steps as the drop took, then knowledge emerges to an attribute accuracy of at least 0.8.
"""

from __future__ import annotations

import pandas as pd
import pytest

from factlens.bios.phases import drop_end, plateau_end, ratio_phases, three_phases
from factlens.bios.trainer import TrainConfig, train
from factlens.errors import ConfigError, ShapeError


class _History:
    def __init__(self, losses, accs, base, every=50):
        self.evals = pd.DataFrame({"step": [every * i for i in range(len(losses))], "attr_loss": losses,
                                   "attr_acc": accs})
        self.baseline = base


def test_three_phases_reads_drop_plateau_and_emergence():
    h = _History([14, 8, 5.0, 4.95, 4.9, 4.85, 4.0, 1.0], [0, 0, 0, 0, 0.01, 0.02, 0.2, 0.9], 4.9)
    assert three_phases(h) == {"drop_end": 100, "plateau_end": 250, "plateau_steps": 150, "first_in_band": 100,
                               "final_acc": 0.9, "band": 0.03}
    never = three_phases(_History([14, 8, 6], [0, 0, 0], 4.9))
    assert never["drop_end"] is None and never["plateau_steps"] == 0


def test_three_phases_takes_the_longest_stretch_and_counts_the_drop_to_its_start():
    """A touch of the band before the loss settles does not shorten the plateau; the drop lasts until it settles."""
    losses = [14, 8, 4.95, 5.2, 4.9, 4.85, 4.9, 4.8, 5.5, 4.9, 1.0]  # touch at 100, settles 200-350, late touch 450
    h = _History(losses, [0] * 10 + [0.9], 4.9)
    p = three_phases(h)
    assert (p["first_in_band"], p["drop_end"], p["plateau_end"], p["plateau_steps"]) == (100, 200, 350, 150)
    assert p["plateau_steps"] < p["drop_end"]  # judged against the later, longer drop: not a pass
    tie = three_phases(_History([14, 4.9, 4.9, 6, 4.9, 4.9, 1], [0] * 6 + [1], 4.9))
    assert (tie["drop_end"], tie["plateau_end"]) == (50, 100)  # equal stretches: the earliest


def test_demo_preset_is_the_documented_recipe():
    cfg = TrainConfig.preset("demo")
    assert (cfg.model["n_layer"], cfg.model["n_head"], cfg.model["n_embd"]) == (2, 4, 128)
    assert (cfg.n_people, cfg.steps, cfg.batch_size, cfg.lr, cfg.min_lr) == (650, 1_800, 32, 2e-3, 4e-4)  # docs
    assert tuple(cfg.betas) == (0.9, 0.995)
    pools = cfg.make_pools()
    assert pools.pool_size("birth_date") == 24 and pools.pool_sizes[1:] == (10,) * 5
    assert 20 * pools.pool_size("birth_date") <= cfg.n_people  # every date is shared by many people


def _chance_accuracy(pools) -> float:
    """Accuracy of a model that knows no one: each value right with probability 1 / pool size."""
    return sum(1 / k for k in pools.pool_sizes) / len(pools.pool_sizes)


@pytest.mark.slow
def test_three_phases_demo_preset(tmp_path):
    """The README's main job: the full demo preset (about 2.7 minutes on 2 idle CPU cores; .ci/run runs it)."""
    cfg = TrainConfig.preset("demo")
    history = train(cfg, tmp_path, progress=False)
    p = three_phases(history, band=0.03)
    ev = history.evals.set_index("step")
    assert ev["attr_loss"].iloc[0] > 2 * history.baseline                  # starts far above the baseline
    assert p["drop_end"] is not None, "the loss never came within 3% of the no-knowledge baseline"
    assert p["plateau_steps"] >= p["drop_end"], p                           # the plateau is as long as the drop
    chance = _chance_accuracy(cfg.make_pools())
    assert ev.loc[p["drop_end"], "attr_acc"] < 2 * chance                   # on the plateau it knows (almost) no one
    assert ev.loc[p["plateau_end"], "attr_acc"] < 0.25 * p["final_acc"]     # ... under a quarter of what it learns
    assert p["final_acc"] >= 0.8, p                                         # then knowledge emerges


def test_demo_figure_shades_the_three_phases_and_zooms_on_the_band():
    from factlens.bios.history import TrainingHistory
    from factlens.cli.bios import demo_figure

    h = _History([14, 8, 5.0, 4.95, 4.9, 4.85, 4.0, 1.0], [0, 0, 0, 0, 0.01, 0.02, 0.2, 0.9], 4.9)
    history = TrainingHistory(evals=h.evals, train=pd.DataFrame({"step": [], "loss": []}), baseline=4.9)
    p = three_phases(history)
    fig = demo_figure(history, p)
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    spans = sorted({(s.x0, s.x1) for s in rects if s.y0 is None or s.yref.endswith("domain")})
    assert spans == [(0, 100), (100, 250), (250, 350)]  # drop, plateau, emergence, on both panels
    band = [s for s in rects if s.xref.endswith("domain") and s.y0 is not None and not s.yref.endswith("domain")]
    assert [(round(s.y0, 3), round(s.y1, 3)) for s in band] == [(4.753, 5.047)]  # the ±3% band
    texts = [a.text for a in fig.layout.annotations]
    assert "new text" not in texts and {"1 drop", "2 plateau", "3 emergence"} <= set(texts)
    assert fig.layout.yaxis.type == "linear" and tuple(fig.layout.yaxis.range) == (0, 9.8)


def test_plateau_end():
    steps = [0, 100, 200, 300, 400, 500]
    losses = [39.0, 6.5, 6.9, 6.8, 6.6, 3.0]
    baseline = 6.785
    assert plateau_end(steps, losses, baseline) == 400  # 6.5 at step 100 is before min_step
    assert plateau_end(steps, losses, baseline, min_step=0) == 100
    assert plateau_end(steps, losses, baseline, ratio=0.5) == 500
    assert plateau_end(steps, losses, baseline, ratio=0.1) is None
    assert plateau_end(steps[::-1], losses[::-1], baseline) == 400  # order of the input does not matter
    with pytest.raises(ShapeError):
        plateau_end([0, 1], [1.0], baseline)
    with pytest.raises(ConfigError):
        plateau_end([0], [1.0], baseline=0)


def test_ratio_reading_starts_after_the_drop():
    steps, losses = [0, 100, 200, 300, 400], [39.0, 6.5, 6.9, 6.6, 3.0]
    assert drop_end(steps, losses, 6.785) == 100
    assert ratio_phases(steps, losses, 6.785) == (100, 100)  # 6.5 < 0.98 x 6.785 already at the drop's end
    assert ratio_phases(steps, [39.0, 7.0, 6.9, 6.7, 3.0], 6.785) == (100, 400)
    assert ratio_phases(steps, [39.0] * 5, 6.785) == (None, None)  # never near the baseline: no phases
    assert ratio_phases(steps, losses, 6.785, min_step=200) == (100, 300)
