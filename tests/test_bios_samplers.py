"""Samplers of people: distributions, schedules, determinism and configuration errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from factlens.bios.data.samplers import (
    Celebrities,
    PowerLaw,
    Replay,
    Sampler,
    Sequential,
    Uniform,
    WarmUp,
    make_sampler,
)
from factlens.errors import ConfigError

DRAWS = 200_000


def chi2_ok(samples: np.ndarray, p: np.ndarray) -> bool:
    """Chi-square goodness of fit against ``p`` (bound df + 5 sqrt(2 df)); cells with p = 0 must be empty."""
    counts = np.bincount(samples, minlength=len(p))
    if len(counts) != len(p) or counts[p == 0].any():
        return False
    expected = p[p > 0] * len(samples)
    df = max(int((p > 0).sum()) - 1, 1)
    chi2 = float(((counts[p > 0] - expected) ** 2 / expected).sum())
    return chi2 < df + 5 * math.sqrt(2 * df)


SAMPLERS = [
    Uniform(50),
    PowerLaw(50, alpha=0.0),
    PowerLaw(50, alpha=0.6),
    PowerLaw(50, alpha=1.0),
    Celebrities(50, n_celebrities=5, weight=8),
    Celebrities(50, n_celebrities=0, weight=8),
    WarmUp(50, n_warmup=10, epochs=2, batch_size=10),
    Sequential(50, n_groups=4, n_repeats=2, total_steps=80),
    Replay(n_old=40, n_new=10, old_weight=0.25),
    Replay(n_old=40, n_new=10, old_weight=0.0),
]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=repr)
@pytest.mark.parametrize("step", [0, 9, 10, 45, 79])
def test_draws_follow_the_stated_distribution(sampler: Sampler, step: int):
    p = sampler.probabilities(step)
    assert p.shape == (sampler.n,) and math.isclose(p.sum(), 1.0) and (p >= 0).all()
    draws = sampler(step, DRAWS, np.random.default_rng(step))
    assert draws.dtype == np.int64 and draws.shape == (DRAWS,)
    assert chi2_ok(draws, p)


def test_chi2_check_detects_a_wrong_distribution():
    draws = PowerLaw(50, alpha=1.0)(0, DRAWS, np.random.default_rng(0))
    assert not chi2_ok(draws, Uniform(50).probabilities(0))
    assert not chi2_ok(draws, PowerLaw(50, alpha=0.8).probabilities(0))


def test_power_law_weights_and_limits():
    p = PowerLaw(1000, alpha=1.0).probabilities(0)
    assert p[0] / p[9] == pytest.approx(10.0) and p[0] / p[999] == pytest.approx(1000.0)
    assert np.allclose(PowerLaw(100, alpha=0.0).probabilities(0), 0.01)
    scaled = PowerLaw(100, 0.4).probabilities(0) * np.arange(1, 101) ** 0.4
    assert np.allclose(scaled, scaled[0])
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="alpha"):
            PowerLaw(10, alpha=bad)


def test_celebrity_share_and_errors():
    s = Celebrities(64000, n_celebrities=4000, weight=8)
    draws = s(0, DRAWS, np.random.default_rng(1))
    share = (draws < 4000).mean()
    expected = 4000 * 8 / (4000 * 8 + 60000)
    assert abs(share - expected) < 5 * math.sqrt(expected * (1 - expected) / DRAWS)
    assert draws.max() < 64000 and draws.min() >= 0
    with pytest.raises(ConfigError, match="n_celebrities <= n"):
        Celebrities(100, n_celebrities=101, weight=2)
    for weight in (0, -1):
        with pytest.raises(ConfigError, match="weight"):
            Celebrities(100, n_celebrities=10, weight=weight)


def test_warm_up_switches_exactly_at_the_epoch_boundary():
    s = WarmUp(64000, n_warmup=8000, epochs=3, batch_size=128)
    assert s.warmup_steps == 1500  # one epoch = 64000 / 128 = 500 steps, counted on everyone
    rng = np.random.default_rng(0)
    assert s(1499, DRAWS, rng).max() < 8000
    after = s(1500, DRAWS, rng)
    assert after.max() >= 60000 and (after >= 8000).mean() > 0.8
    assert s.active_n(0) == 8000 and s.active_n(1499) == 8000 and s.active_n(1500) == 64000
    assert WarmUp(100, n_warmup=10, epochs=1.5, batch_size=30).warmup_steps == 5  # ceil(1.5 * 100 / 30)
    with pytest.raises(ConfigError, match="n_warmup <= n"):
        WarmUp(100, n_warmup=101, epochs=1, batch_size=10)
    for epochs in (0, -1):
        with pytest.raises(ConfigError, match="epochs"):
            WarmUp(100, n_warmup=10, epochs=epochs, batch_size=10)


def test_sequential_visits_groups_in_order_and_repeats():
    s = Sequential(100, n_groups=4, n_repeats=2, total_steps=800)
    groups = [s.group(step) for step in range(0, 800, 100)]
    assert groups == [0, 1, 2, 3, 0, 1, 2, 3]
    assert s.group(99) == 0 and s.group(100) == 1 and s.group(10_000) == 3
    draws = s(250, 10_000, np.random.default_rng(0))
    assert draws.min() >= 50 and draws.max() < 75
    sizes = [int((s.probabilities(step) > 0).sum()) for step in (0, 100, 200, 300)]
    assert sum(sizes) == 100
    uneven = Sequential(10, n_groups=3, n_repeats=1, total_steps=3)
    assert [int((uneven.probabilities(k) > 0).sum()) for k in range(3)] == [4, 3, 3]
    with pytest.raises(ConfigError, match="n_groups <= n"):
        Sequential(3, n_groups=4, n_repeats=1, total_steps=10)
    with pytest.raises(ConfigError, match="n_repeats"):
        Sequential(30, n_groups=4, n_repeats=0, total_steps=10)


def test_replay_mixes_old_and_new_people():
    s = Replay(n_old=64000, n_new=4000, old_weight=1 / 32)
    draws = s(0, DRAWS, np.random.default_rng(2))
    expected_old = 64000 / 32 / (64000 / 32 + 4000)
    assert abs((draws < 64000).mean() - expected_old) < 0.01
    assert draws.max() < 68000
    only_new = Replay(n_old=100, n_new=10, old_weight=0)(0, 5000, np.random.default_rng(0))
    assert only_new.min() >= 100 and only_new.max() < 110
    with pytest.raises(ConfigError, match="old_weight"):
        Replay(n_old=10, n_new=10, old_weight=-1)
    with pytest.raises(ConfigError, match="n_new"):
        Replay(n_old=10, n_new=0, old_weight=1)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=repr)
def test_samplers_are_deterministic_given_the_generator(sampler: Sampler):
    a = sampler(3, 1000, np.random.default_rng([7, 3]))
    b = sampler(3, 1000, np.random.default_rng([7, 3]))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, sampler(3, 1000, np.random.default_rng([7, 4]))) or sampler.n == 1


def test_make_sampler_and_describe():
    s = make_sampler("power_law", n=100, alpha=0.6)
    assert isinstance(s, PowerLaw) and repr(s) == "PowerLaw(n=100, alpha=0.6)" == s.describe()
    assert "n_warmup=10" in make_sampler("warmup", n=100, n_warmup=10, epochs=1, batch_size=10).describe()
    with pytest.raises(ConfigError, match="unknown sampler"):
        make_sampler("zipfian", n=10)
    with pytest.raises(ConfigError, match="bad arguments"):
        make_sampler("uniform", n=10, alpha=1)
    with pytest.raises(ConfigError, match="population size"):
        Uniform(0)
