"""Who is in each training batch: uniform, power-law, celebrities, warm-up, sequential and replay samplers.

Every sampler is a callable ``sampler(step, batch_size, rng) -> np.int64 array`` of person indices in
``[0, sampler.n)``; ``sampler.probabilities(step)`` gives the exact distribution it draws from at that step
and ``describe()`` (also the ``repr``) a one-line summary. These are the data distributions of Zucchet et
al. (2025) §3 and §4 (App. B.2, E, F):

- :class:`Uniform` — everyone equally often (the default).
- :class:`PowerLaw` — ``p(i) ∝ (i + 1)^-alpha`` in index order (alpha 0 = uniform, 1 = Zipf).
- :class:`Celebrities` — the first ``n_celebrities`` people ``weight`` times as often as the rest.
- :class:`WarmUp` — uniform over the first ``n_warmup`` people for ``epochs`` epochs (one epoch =
  ``n / batch_size`` steps, counted on the whole population), then uniform over everyone.
- :class:`Sequential` — ``n_groups`` contiguous groups visited in order, ``n_repeats`` times over the run.
- :class:`Replay` — fine-tuning on new people (indices after the ``n_old`` old ones) with old people
  weighted ``old_weight``.

Example:
    >>> import numpy as np
    >>> from factlens.bios.data.samplers import PowerLaw
    >>> s = PowerLaw(1000, alpha=1.0)
    >>> s(0, 4, np.random.default_rng(0)).dtype, s
    (dtype('int64'), PowerLaw(n=1000, alpha=1.0))
"""

from __future__ import annotations

import math

import numpy as np
from jaxtyping import Float, Int

from factlens.errors import ConfigError


def _positive_int(name: str, value: int, fix: str) -> int:
    if int(value) != value or value < 1:
        raise ConfigError(f"{name}={value!r}; {fix}")
    return int(value)


class Sampler:
    """Base class: a distribution over ``n`` people, possibly changing with the step."""

    n: int

    def probabilities(self, step: int) -> Float[np.ndarray, " n"]:
        """The distribution over people at ``step`` (sums to 1)."""
        raise NotImplementedError

    def __call__(self, step: int, batch_size: int, rng: np.random.Generator) -> Int[np.ndarray, " batch"]:
        cdf = np.cumsum(self.probabilities(step))
        return np.minimum(np.searchsorted(cdf, rng.random(batch_size) * cdf[-1], side="right"), self.n - 1)

    def describe(self) -> str:
        """One-line summary, e.g. ``'Celebrities(n=65536, n_celebrities=4096, weight=8.0)'``."""
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    def __repr__(self) -> str:
        return self.describe()


class Uniform(Sampler):
    """Everyone equally often.

    Example:
        >>> import numpy as np
        >>> from factlens.bios import Uniform
        >>> Uniform(10)(0, 3, np.random.default_rng(0)).shape
        (3,)
    """

    def __init__(self, n: int) -> None:
        self.n = _positive_int("n", n, "pass a population size >= 1")

    def probabilities(self, step: int) -> np.ndarray:
        return np.full(self.n, 1.0 / self.n)

    def __call__(self, step: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, self.n, batch_size, dtype=np.int64)


class PowerLaw(Sampler):
    """Inverse power law over the index order: ``p(i) ∝ (i + 1)^-alpha``.

    Example:
        >>> import numpy as np
        >>> from factlens.bios import PowerLaw
        >>> p = PowerLaw(3, alpha=1.0).probabilities(0)
        >>> np.round(p / p[-1], 3).tolist()
        [3.0, 1.5, 1.0]
    """

    def __init__(self, n: int, alpha: float) -> None:
        self.n = _positive_int("n", n, "pass a population size >= 1")
        if not alpha >= 0 or math.isinf(alpha):
            raise ConfigError(f"alpha={alpha!r}; pass a finite alpha >= 0 (0 = uniform, 1 = Zipf)")
        self.alpha = float(alpha)
        w = np.arange(1, self.n + 1, dtype=np.float64) ** -self.alpha
        self._p = w / w.sum()
        self._cdf = np.cumsum(self._p)

    def probabilities(self, step: int) -> np.ndarray:
        return self._p

    def __call__(self, step: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        u = rng.random(batch_size) * self._cdf[-1]
        return np.minimum(np.searchsorted(self._cdf, u, side="right"), self.n - 1).astype(np.int64)


class Celebrities(Sampler):
    """The first ``n_celebrities`` people are drawn ``weight`` times as often as each other person.

    Example:
        >>> from factlens.bios import Celebrities
        >>> p = Celebrities(10, n_celebrities=2, weight=4).probabilities(0)
        >>> round(float(p[0] / p[-1]), 6), round(float(p[:2].sum()), 4)
        (4.0, 0.5)
    """

    def __init__(self, n: int, n_celebrities: int, weight: float) -> None:
        self.n = _positive_int("n", n, "pass a population size >= 1")
        if int(n_celebrities) != n_celebrities or not 0 <= n_celebrities <= self.n:
            raise ConfigError(
                f"n_celebrities={n_celebrities!r} does not fit a population of {self.n}; pass "
                f"0 <= n_celebrities <= n or use more people"
            )
        if not weight > 0 or math.isinf(weight):
            raise ConfigError(f"weight={weight!r}; pass a finite weight > 0 (1 = uniform)")
        self.n_celebrities, self.weight = int(n_celebrities), float(weight)
        w = np.ones(self.n)
        w[: self.n_celebrities] = self.weight
        self._p = w / w.sum()

    def probabilities(self, step: int) -> np.ndarray:
        return self._p

    def __call__(self, step: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        c = self.n_celebrities
        p_celeb = c * self.weight / (c * self.weight + (self.n - c))
        celeb = rng.random(batch_size) < p_celeb
        idx = rng.integers(0, max(self.n - c, 1), batch_size) + c
        idx[celeb] = rng.integers(0, max(c, 1), int(celeb.sum()))
        return idx.astype(np.int64)


class WarmUp(Sampler):
    """Uniform over the first ``n_warmup`` people for ``epochs`` epochs, then uniform over everyone.

    One epoch is ``n / batch_size`` steps counted on the **whole** population (500 steps for 64k people
    and batch 128), so the warm-up covers steps ``0 .. warmup_steps - 1`` with
    ``warmup_steps = ceil(epochs * n / batch_size)``.

    Example:
        >>> import numpy as np
        >>> from factlens.bios import WarmUp
        >>> s = WarmUp(64, n_warmup=8, epochs=2, batch_size=8)
        >>> s.warmup_steps, int(s(15, 100, np.random.default_rng(0)).max()) < 8
        (16, True)
    """

    def __init__(self, n: int, n_warmup: int, epochs: float, batch_size: int) -> None:
        self.n = _positive_int("n", n, "pass a population size >= 1")
        self.n_warmup = _positive_int("n_warmup", n_warmup, "pass n_warmup >= 1")
        if self.n_warmup > self.n:
            raise ConfigError(
                f"n_warmup={n_warmup} exceeds the population ({self.n}); pass n_warmup <= n or "
                f"use more people"
            )
        if not epochs > 0 or math.isinf(epochs):
            raise ConfigError(f"epochs={epochs!r}; pass a finite number of warm-up epochs > 0")
        self.epochs = float(epochs)
        self.batch_size = _positive_int("batch_size", batch_size, "pass the training batch size")
        self.warmup_steps = math.ceil(self.epochs * self.n / self.batch_size - 1e-9)

    def active_n(self, step: int) -> int:
        """How many people (the first ones) are sampled at ``step``."""
        return self.n_warmup if step < self.warmup_steps else self.n

    def probabilities(self, step: int) -> np.ndarray:
        p = np.zeros(self.n)
        p[: self.active_n(step)] = 1.0 / self.active_n(step)
        return p

    def __call__(self, step: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, self.active_n(step), batch_size, dtype=np.int64)


class Sequential(Sampler):
    """Contiguous groups of people visited in order, ``n_repeats`` times over ``total_steps``.

    The run is cut into ``n_groups * n_repeats`` equal phases; phase ``k`` samples uniformly from group
    ``k % n_groups`` (groups are ``np.array_split(arange(n), n_groups)``). Steps past ``total_steps`` stay in
    the last phase. ``n_groups=2, n_repeats=4`` is the paper's alternating setting.

    Example:
        >>> from factlens.bios import Sequential
        >>> s = Sequential(100, n_groups=4, n_repeats=1, total_steps=400)
        >>> s.group(0), s.group(99), s.group(100), s.group(399)
        (0, 0, 1, 3)
    """

    def __init__(self, n: int, n_groups: int, n_repeats: int, total_steps: int) -> None:
        self.n = _positive_int("n", n, "pass a population size >= 1")
        self.n_groups = _positive_int("n_groups", n_groups, "pass n_groups >= 1")
        if self.n_groups > self.n:
            raise ConfigError(f"n_groups={n_groups} exceeds the population ({self.n}); pass n_groups <= n")
        self.n_repeats = _positive_int("n_repeats", n_repeats, "pass n_repeats >= 1")
        self.total_steps = _positive_int("total_steps", total_steps, "pass the run length in steps (>= 1)")
        sizes = [len(g) for g in np.array_split(np.arange(self.n), self.n_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def group(self, step: int) -> int:
        """Index of the group sampled at ``step``."""
        phases = self.n_groups * self.n_repeats
        phase = min(int(step) * phases // self.total_steps, phases - 1)
        return phase % self.n_groups

    def probabilities(self, step: int) -> np.ndarray:
        g = self.group(step)
        lo, hi = self._starts[g], self._starts[g + 1]
        p = np.zeros(self.n)
        p[lo:hi] = 1.0 / (hi - lo)
        return p

    def __call__(self, step: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        g = self.group(step)
        return rng.integers(self._starts[g], self._starts[g + 1], batch_size, dtype=np.int64)


class Replay(Sampler):
    """Fine-tuning mix: each old person has weight ``old_weight``, each new person weight 1.

    Old people are indices ``0 .. n_old - 1`` and new people ``n_old .. n_old + n_new - 1`` (the layout of
    ``Population.concatenate([old, new])``). ``old_weight=0`` is fine-tuning without replay. The chance
    that a draw is an old person is ``n_old * w / (n_old * w + n_new)``.

    Example:
        >>> from factlens.bios import Replay
        >>> s = Replay(n_old=64, n_new=4, old_weight=1 / 16)
        >>> round(float(s.probabilities(0)[:64].sum()), 3)
        0.5
    """

    def __init__(self, n_old: int, n_new: int, old_weight: float) -> None:
        if int(n_old) != n_old or n_old < 0:
            raise ConfigError(f"n_old={n_old!r}; pass the number of pre-training people (>= 0)")
        self.n_old = int(n_old)
        self.n_new = _positive_int("n_new", n_new, "pass the number of new fine-tuning people (>= 1)")
        if not old_weight >= 0 or math.isinf(old_weight):
            raise ConfigError(f"old_weight={old_weight!r}; pass a finite weight >= 0 (0 = no replay)")
        self.old_weight = float(old_weight)
        self.n = self.n_old + self.n_new
        w = np.ones(self.n)
        w[: self.n_old] = self.old_weight
        self._p = w / w.sum()

    def describe(self) -> str:
        return f"Replay(n_old={self.n_old}, n_new={self.n_new}, old_weight={self.old_weight})"

    def probabilities(self, step: int) -> np.ndarray:
        return self._p

    def __call__(self, step: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        mass_old = self.n_old * self.old_weight
        old = rng.random(batch_size) < mass_old / (mass_old + self.n_new)
        idx = rng.integers(0, self.n_new, batch_size) + self.n_old
        idx[old] = rng.integers(0, max(self.n_old, 1), int(old.sum()))
        return idx.astype(np.int64)


SAMPLERS: dict[str, type[Sampler]] = {
    cls.__name__.lower(): cls for cls in (Uniform, PowerLaw, Celebrities, WarmUp, Sequential, Replay)
}


def make_sampler(spec: str | dict, *, n: int, batch_size: int | None = None, **kwargs) -> Sampler:
    """Build a sampler over ``n`` people from a name or a JSON-able spec (as stored in a run's config).

    ``spec`` is a kind (``uniform``, ``power_law``, ``celebrities``, ``warmup``, ``sequential``, ``replay``;
    case, ``_`` and ``-`` are ignored) or a dict such as ``{"kind": "power_law", "alpha": 0.6}``; keyword
    arguments add to the dict's. ``batch_size`` is passed to the samplers that count in batches (the warm-up's
    epochs).

    Example:
        >>> from factlens.bios import make_sampler
        >>> make_sampler("celebrities", n=100, n_celebrities=10, weight=8)
        Celebrities(n=100, n_celebrities=10, weight=8.0)
        >>> make_sampler({"kind": "power_law", "alpha": 0.6}, n=100).describe()
        'PowerLaw(n=100, alpha=0.6)'
    """
    if isinstance(spec, str):
        spec = {"kind": spec}
    elif not isinstance(spec, dict):
        raise ConfigError(f"a sampler spec is a kind or a dict like {{'kind': 'uniform'}}, got {type(spec).__name__}")
    spec = {**spec, **kwargs}
    kind = str(spec.pop("kind", "uniform"))
    key = kind.lower().replace("_", "").replace("-", "")
    if key not in SAMPLERS:
        raise ConfigError(f"unknown sampler {kind!r}; pass one of {sorted(SAMPLERS)}")
    if key == "warmup" and batch_size is not None:
        spec.setdefault("batch_size", batch_size)
    try:
        return SAMPLERS[key](n=n, **spec)
    except TypeError as err:
        raise ConfigError(
            f"bad arguments for sampler {kind!r}: {err}; see help(factlens.bios.data.samplers)"
        ) from err


__all__ = [
    "SAMPLERS",
    "Celebrities",
    "PowerLaw",
    "Replay",
    "Sampler",
    "Sequential",
    "Uniform",
    "WarmUp",
    "make_sampler",
]
