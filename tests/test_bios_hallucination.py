"""Hallucination metrics over training: every evaluation set reports loss, accuracy, top-token probability and
entropy, pooled over unequal batches exactly as one mean over values / value tokens."""

from __future__ import annotations

import torch

from bios_reference import hand_value_token_stats
from factlens.bios.history import TrainingHistory
from factlens.bios.trainer import TrainConfig, Trainer, train

TINY_POOLS = dict(first_names=30, last_names=30, cities=20, universities=10, majors=8, companies=10, years=20)


def tiny_config(**overrides) -> TrainConfig:
    base = dict(steps=10, n_people=48, batch_size=8, n_eval_sequences=10, n_unseen=7, checkpoint_every=5,
                log_every=5, resume_every=5, pools=TINY_POOLS, eval_batch_size=4)
    return TrainConfig.preset("tiny", **{**base, **overrides})


def test_evaluate_pools_unequal_batches_by_values_and_value_tokens(tmp_path):
    trainer = Trainer(tiny_config(), tmp_path, progress=False)
    torch.manual_seed(0)
    with torch.no_grad():  # sharpen the random model so top-prob and entropy differ between batches
        trainer.raw_model.lm_head.weight.mul_(30)
    got = trainer.evaluate()
    model = trainer.raw_model.eval()
    for prefix, batches in trainer.task.eval_sets.items():
        assert len({len(b) for b in batches}) > 1  # 10 = 4 + 4 + 2 and 7 = 4 + 3 sequences
        with torch.no_grad():
            hand = hand_value_token_stats([(model(b.tokens).logits.float(), b) for b in batches])
        for key in ("attr_loss", "attr_acc", "top_prob", "entropy"):
            assert abs(got[prefix + key] - hand[key]) <= 1e-5 * max(1.0, abs(hand[key])), (prefix, key)
    assert {"attr_loss", "attr_acc", "top_prob", "entropy", "unseen_attr_loss", "unseen_attr_acc",
            "unseen_top_prob", "unseen_entropy"} == set(got)


def test_history_plot_shows_seen_and_unseen_side_by_side(tmp_path):
    history = train(tiny_config(), tmp_path, progress=False)
    assert isinstance(history, TrainingHistory)
    fig = history.plot()
    panels = [a.text for a in fig.layout.annotations]
    assert any("top-token probability" in t for t in panels) and any("entropy" in t for t in panels)
    names = {(t.name, t.yaxis) for t in fig.data}
    for axis in ("y3", "y4"):  # confidence panels: one trace for seen people, one for unseen
        assert {"held-out templates", "unseen people"} <= {n for n, a in names if a == axis}
