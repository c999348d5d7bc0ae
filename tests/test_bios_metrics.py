"""Knowledge metrics on hand-built logits whose answers are known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bios_reference import hand_value_token_stats
from factlens.bios import (
    AttributeMetrics,
    BiosVocab,
    Pools,
    Population,
    attribute_accuracy,
    attribute_loss,
    attribute_metrics,
    hallucination_metrics,
    make_batch,
    per_attribute_loss,
    value_correct,
    value_nll,
)
from factlens.errors import EmptyDatasetError, ShapeError

B, SEQ_LEN = 4, 96


@pytest.fixture(scope="module")
def setup():
    pools = Pools.sized(
        first_names=20, last_names=20, cities=30, universities=30, majors=20, companies=30, years=10
    )
    vocab = BiosVocab(pools)
    pop = Population.generate(50, seed=0, pools=pools)
    batch = make_batch(pop, vocab, np.arange(B), rng=np.random.default_rng(0), seq_len=SEQ_LEN)
    return vocab, batch


def perfect_logits(batch, vocab_size: int, margin: float = 60.0) -> torch.Tensor:
    """Logits whose argmax at every position p - 1 is the true token at p, with a huge margin."""
    logits = torch.zeros(len(batch), SEQ_LEN, vocab_size)
    logits[:, :-1].scatter_(-1, batch.tokens[:, 1:, None], margin)
    return logits


def test_perfect_logits_give_zero_loss_and_full_accuracy(setup):
    vocab, batch = setup
    logits = perfect_logits(batch, vocab.size)
    assert attribute_loss(logits, batch).item() == pytest.approx(0.0, abs=1e-6)
    assert attribute_accuracy(logits, batch).item() == 1.0
    stats = hallucination_metrics(logits, batch)
    assert set(stats) == {"attr_loss", "attr_acc", "top_prob", "entropy"}
    assert stats["top_prob"] == pytest.approx(1.0, abs=1e-6) and stats["entropy"] == pytest.approx(
        0.0, abs=1e-5
    )


def test_uniform_logits_give_tokens_times_log_vocab(setup):
    vocab, batch = setup
    logits = torch.zeros(len(batch), SEQ_LEN, vocab.size)
    ln_v = math.log(vocab.size)
    nll = value_nll(logits, batch)
    assert torch.allclose(nll, batch.value_len.float() * ln_v, rtol=1e-5)
    expected = batch.value_len.sum().item() * ln_v / (6 * len(batch))
    assert attribute_loss(logits, batch).item() == pytest.approx(expected, rel=1e-5)
    assert batch.value_len[:, 0].eq(4).all()  # a date is 4 tokens: month, day, ',', year
    assert per_attribute_loss(logits, batch)[0].item() == pytest.approx(4 * ln_v, rel=1e-5)
    assert per_attribute_loss(logits, batch).mean().item() == pytest.approx(expected, rel=1e-5)
    stats = hallucination_metrics(logits, batch)
    assert stats["top_prob"] == pytest.approx(1 / vocab.size, rel=1e-4)
    assert stats["entropy"] == pytest.approx(ln_v, rel=1e-5)


def test_one_wrong_token_costs_exactly_one_value(setup):
    vocab, batch = setup
    logits = perfect_logits(batch, vocab.size)
    # Sequence 1, birth date (4 tokens): make only its *last* token wrong at its predicting position.
    pos = int(batch.value_start[1, 0] + batch.value_len[1, 0] - 1)
    wrong = (int(batch.tokens[1, pos]) + 1) % vocab.size
    logits[1, pos - 1, wrong] = 100.0
    assert attribute_accuracy(logits, batch).item() == pytest.approx(1 - 1 / (6 * len(batch)))
    correct = value_correct(logits, batch)
    assert not correct[1, 0] and correct.sum() == 6 * len(batch) - 1
    # Its loss grows by about 40 nats (100 - 60) on that one value only.
    nll = value_nll(logits, batch)
    assert nll[1, 0].item() == pytest.approx(40.0, abs=1e-3) and nll.sum().item() == pytest.approx(
        40.0, abs=1e-3
    )


def test_only_value_tokens_count(setup):
    vocab, batch = setup
    logits = perfect_logits(batch, vocab.size)
    non_value = ~(batch.value_attr[:, 1:] >= 0)  # targets that are not value tokens
    noise = torch.randn(len(batch), SEQ_LEN - 1, vocab.size, generator=torch.Generator().manual_seed(0)) * 50
    logits[:, :-1][non_value] += noise[non_value]
    assert attribute_loss(logits, batch).item() == pytest.approx(0.0, abs=1e-5)
    assert attribute_accuracy(logits, batch).item() == 1.0


def test_attribute_loss_is_differentiable(setup):
    vocab, batch = setup
    logits = torch.zeros(len(batch), SEQ_LEN, vocab.size, requires_grad=True)
    attribute_loss(logits, batch).backward()
    grad_rows = logits.grad.abs().sum(-1)  # [b, p]
    predicting = torch.zeros_like(grad_rows, dtype=torch.bool)
    predicting[:, :-1] = batch.value_attr[:, 1:] >= 0
    assert (grad_rows[predicting] > 0).all() and (grad_rows[~predicting] == 0).all()


def test_attribute_metrics_per_attribute_and_combine(setup):
    vocab, batch = setup
    perfect = attribute_metrics(perfect_logits(batch, vocab.size), batch)
    uniform = attribute_metrics(torch.zeros(len(batch), SEQ_LEN, vocab.size), batch)
    assert perfect.loss.shape == (6,) and perfect.n_sequences == len(batch)
    assert torch.equal(perfect.n_tokens, batch.value_len.sum(0))
    both = AttributeMetrics.combine([perfect, uniform])
    assert both.n_sequences == 2 * len(batch)
    assert both.attribute_loss == pytest.approx(uniform.attribute_loss / 2, rel=1e-5)
    assert both.attribute_accuracy == pytest.approx(0.5)
    df = both.to_dataframe()
    assert len(df) == 24 and set(df.columns) == {"attribute", "metric", "value"}
    fig = both.plot()
    assert fig.layout.title.text.startswith("Attribute metrics")
    with pytest.raises(EmptyDatasetError):
        AttributeMetrics.combine([])


def test_shape_mismatch_raises(setup):
    vocab, batch = setup
    with pytest.raises(ShapeError, match="same batch"):
        attribute_loss(torch.zeros(len(batch), SEQ_LEN - 1, vocab.size), batch)


def test_pooled_metrics_are_means_over_all_value_tokens_of_unequal_batches(setup):
    """Batches of 1 and 4 sequences (unequal value-token counts): pooling equals one mean over all tokens."""
    vocab, _ = setup
    pop = Population.generate(50, seed=3, pools=vocab.pools)
    g = torch.Generator().manual_seed(0)
    parts = []
    for idx in (np.arange(1), np.arange(1, 5), np.arange(5, 7)):
        batch = make_batch(pop, vocab, idx, rng=np.random.default_rng(int(idx[0])), seq_len=SEQ_LEN)
        logits = torch.randn(len(idx), SEQ_LEN, vocab.size, generator=g) * 3
        parts.append((logits, batch))
    counts = [int(b.value_len.sum()) for _, b in parts]
    assert len(set(counts)) == 3  # unequal token counts
    pooled = AttributeMetrics.combine([attribute_metrics(lg, b) for lg, b in parts])
    hand = hand_value_token_stats(parts)
    assert int(pooled.n_tokens.sum()) == hand["n_tokens"] == sum(counts)
    for key, value in pooled.summary().items():
        assert value == pytest.approx(hand[key], rel=1e-6, abs=1e-9), key
    # the old pooling (per-batch means weighted by sequences) is measurably off for the token means
    by_seq = sum(hallucination_metrics(lg, b)["top_prob"] * len(b) for lg, b in parts) / 7
    assert abs(by_seq - hand["top_prob"]) > 1e-5
