"""The synthetic population: unique names, six attribute values and a per-person template split.

:meth:`Population.generate` draws, with one ``numpy.random.Generator`` seeded by ``seed`` (so the result is
byte-identical in every process), for each of ``n_people`` people:

- a unique full name (first, middle, last; first and middle from the same list; a colliding name is
  re-drawn);
- six attribute values, uniform and independent (birth date: day, month and year drawn independently);
- for every attribute, a random split of the 25 templates into ``n_train_templates`` (20) used in training
  and the rest (5) held out for evaluation.

Unseen people (for the hallucination evaluation of Zucchet et al. 2025 §4) come from
:meth:`Population.unseen`: a new population whose names are all disjoint from this one's.
:meth:`Population.concatenate` joins populations (old people first, then new ones, as the
:class:`~factlens.bios.data.samplers.Replay` sampler expects).

Example:
    >>> from factlens.bios.data.population import Population
    >>> pop = Population.generate(1000, seed=0)
    >>> pop.train_templates.shape, pop.eval_templates.shape
    ((1000, 6, 20), (1000, 6, 5))
    >>> other = pop.unseen(100, seed=1)
    >>> bool(set(pop.name_codes()) & set(other.name_codes()))
    False
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Int

from factlens.bios.data.pools import ATTRIBUTES, LIST_FIELDS, N_DAYS, Pools
from factlens.bios.data.templates import N_TEMPLATES, render_template
from factlens.errors import CheckpointError, ConfigError
from factlens.storage import atomic_write

FORMAT_VERSION = 1
DEFAULT_TRAIN_TEMPLATES = 20
"""Training templates per person and attribute in the paper (the other 5 of 25 are held out)."""


@dataclass(frozen=True, eq=False)
class Population:
    """A fixed set of synthetic people (all arrays are numpy, indexed by person first).

    Attributes:
        names: ``[n, 3]`` indices of first, middle (both into ``pools.first_names``) and last name.
        values: ``[n, 6]`` value index of each attribute in :data:`~factlens.bios.data.pools.ATTRIBUTES` order
            (birth date as a flat index, see :meth:`~factlens.bios.data.pools.Pools.date_parts`).
        train_templates: ``[n, 6, k]`` template indices (0..24) usable in training, sorted.
        eval_templates: ``[n, 6, 25 - k]`` held-out template indices, sorted.
        pools: The pools the indices point into.
        seed: The seed it was generated with (``-1`` for a concatenation).
    """

    names: Int[np.ndarray, "n 3"]
    values: Int[np.ndarray, "n 6"]
    train_templates: Int[np.ndarray, "n 6 k_train"]
    eval_templates: Int[np.ndarray, "n 6 k_eval"]
    pools: Pools
    seed: int = 0

    # --- construction --------------------------------------------------------------------------------
    @classmethod
    def generate(
        cls,
        n_people: int,
        seed: int = 0,
        pools: Pools | None = None,
        *,
        n_train_templates: int = DEFAULT_TRAIN_TEMPLATES,
        exclude: Population | None = None,
    ) -> Population:
        """Draw a population (vectorised: 64k people take about 0.1 s).

        Args:
            n_people: Number of people (at most the number of distinct full names).
            seed: Seed of the ``numpy.random.default_rng`` that draws everything.
            pools: Value pools (default: the paper-sized :meth:`Pools.default`).
            n_train_templates: Templates per person and attribute kept for training (1..24). The paper uses
                20 (its Fig. A ablation varies it). Up to 20, the 5 held-out templates do not depend on it and
                a smaller count keeps a subset of a larger one's templates (same seed); above 20 the held-out
                templates are the remaining ones.
            exclude: Another population whose names must not be reused (for unseen people).

        Raises:
            ConfigError: ``n_people`` is not positive or exceeds the free name space.

        Example:
            >>> from factlens.bios import Population
            >>> Population.generate(5, seed=3).names.shape
            (5, 3)
        """
        pools = pools or Pools.default()
        n_people = int(n_people)
        if exclude is not None and exclude.pools.fingerprint() != pools.fingerprint():
            raise ConfigError("exclude was drawn from different pools; pass pools=exclude.pools")
        taken = exclude.name_codes() if exclude is not None else np.empty(0, np.int64)
        free = pools.n_names - len(taken)
        if not 1 <= n_people <= free:
            raise ConfigError(
                f"n_people={n_people} is out of range: the pools give {pools.n_names:,} distinct "
                f"full names ({len(taken):,} excluded); pass 1 <= n_people <= {free:,} or use "
                f"larger name pools"
            )
        if not 1 <= n_train_templates < N_TEMPLATES:
            raise ConfigError(
                f"n_train_templates={n_train_templates}; pass 1..{N_TEMPLATES - 1} so that some "
                f"templates stay held out"
            )
        rng = np.random.default_rng(seed)
        codes = _unique_codes(rng, n_people, pools.n_names, taken)
        n_first, n_last = len(pools.first_names), len(pools.last_names)
        names = np.stack([codes // (n_first * n_last), (codes // n_last) % n_first, codes % n_last], axis=1)

        values = np.empty((n_people, len(ATTRIBUTES)), dtype=np.int64)
        day = rng.integers(0, pools.days, n_people)
        month = rng.integers(0, 12, n_people)
        year = rng.integers(0, len(pools.years), n_people)
        values[:, 0] = (year * 12 + month) * pools.days + day
        for a in range(1, len(ATTRIBUTES)):
            values[:, a] = rng.integers(0, pools.pool_size(a), n_people)

        order = np.broadcast_to(
            np.arange(N_TEMPLATES, dtype=np.int8), (n_people, len(ATTRIBUTES), N_TEMPLATES)
        )
        order = rng.permuted(order, axis=-1)  # [n, 6, 25], a random permutation per person × attribute
        # Training templates are the first k of the permutation; the held-out ones its last 25 - max(k, 20), so
        # for k <= 20 the held-out split is the same for every k and fewer templates are a subset of more.
        train = np.sort(order[..., :n_train_templates], axis=-1)
        held = np.sort(order[..., max(n_train_templates, DEFAULT_TRAIN_TEMPLATES):], axis=-1)
        return cls(
            names=names.astype(np.int32),
            values=values.astype(np.int32),
            train_templates=train,
            eval_templates=held,
            pools=pools,
            seed=int(seed),
        )

    def unseen(self, n_people: int, seed: int) -> Population:
        """A new population of ``n_people`` whose full names all differ from this population's.

        Values and template splits are drawn afresh; use a ``seed`` different from this population's.

        Example:
            >>> from factlens.bios import Population
            >>> pop = Population.generate(50, seed=0)
            >>> len(pop.unseen(20, seed=1))
            20
        """
        return Population.generate(
            n_people,
            seed=seed,
            pools=self.pools,
            n_train_templates=self.train_templates.shape[-1],
            exclude=self,
        )

    @staticmethod
    def concatenate(populations: list[Population]) -> Population:
        """Join populations in order (indices of later ones follow earlier ones); names must stay unique.

        Example:
            >>> from factlens.bios import Population
            >>> old = Population.generate(30, seed=0)
            >>> both = Population.concatenate([old, old.unseen(10, seed=1)])
            >>> len(both), both.full_name(30) == old.unseen(10, seed=1).full_name(0)
            (40, True)
        """
        if not populations:
            raise ConfigError("concatenate needs at least one population; pass a non-empty list")
        first = populations[0]
        for p in populations[1:]:
            if p.pools.fingerprint() != first.pools.fingerprint():
                raise ConfigError("populations use different pools; generate them with the same pools")
            if p.train_templates.shape[-1] != first.train_templates.shape[-1]:
                raise ConfigError(
                    "populations differ in n_train_templates; generate them with the same value"
                )
        out = Population(
            names=np.concatenate([p.names for p in populations]),
            values=np.concatenate([p.values for p in populations]),
            train_templates=np.concatenate([p.train_templates for p in populations]),
            eval_templates=np.concatenate([p.eval_templates for p in populations]),
            pools=first.pools,
            seed=first.seed if len(populations) == 1 else -1,
        )
        if len(np.unique(out.name_codes())) != len(out):
            raise ConfigError("the populations share full names; build later ones with Population.unseen")
        return out

    # --- access --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.names.shape[0])

    @property
    def n_train_templates(self) -> int:
        """Training templates per person and attribute."""
        return int(self.train_templates.shape[-1])

    def name_codes(self) -> Int[np.ndarray, " n"]:
        """One integer per full name, ``(first * F + middle) * L + last`` (unique within a population)."""
        n_first, n_last = len(self.pools.first_names), len(self.pools.last_names)
        names = self.names.astype(np.int64)
        return (names[:, 0] * n_first + names[:, 1]) * n_last + names[:, 2]

    @property
    def dates(self) -> Int[np.ndarray, "n 3"]:
        """Zero-based (day, month, year) indices of every birth date."""
        return np.stack(self.pools.date_parts(self.values[:, 0]), axis=1)

    def full_name(self, i: int) -> str:
        """Full name of person ``i``, e.g. ``'Mary Ann Smith'``."""
        f, m, last = (int(x) for x in self.names[i])
        p = self.pools
        return f"{p.first_names[f]} {p.first_names[m]} {p.last_names[last]}"

    def facts(self, i: int) -> dict[str, str]:
        """Attribute name -> value text of person ``i``."""
        return {attr: self.pools.render(a, int(self.values[i, a])) for a, attr in enumerate(ATTRIBUTES)}

    def person_text(self, i: int, split: str = "train", rng: np.random.Generator | None = None) -> str:
        """A full biography of person ``i`` for inspection (attribute order; first template of the split
        unless ``rng`` picks one at random).

        Example:
            >>> from factlens.bios import Population
            >>> pop = Population.generate(3, seed=0)
            >>> pop.person_text(0).count(pop.full_name(0))
            6
        """
        pool = self._split_templates(split)
        sentences = []
        for a, value in enumerate(self.facts(i).values()):
            choices = pool[i, a]
            t = int(choices[0] if rng is None else rng.choice(choices))
            sentences.append(render_template(a, t, self.full_name(i), value))
        return " ".join(sentences)

    def _split_templates(self, split: str) -> np.ndarray:
        if split == "train":
            return self.train_templates
        if split == "eval":
            return self.eval_templates
        raise ConfigError(f"split={split!r}; pass 'train' or 'eval'")

    # --- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the population and its pools to a ``.npz`` file atomically (:func:`factlens.storage.atomic_write`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "names": self.names,
            "values": self.values,
            "train_templates": self.train_templates,
            "eval_templates": self.eval_templates,
            "seed": np.int64(self.seed),
            "format_version": np.int64(FORMAT_VERSION),
            "years": np.asarray(self.pools.years),
            "days": np.int64(self.pools.days),
            "pools_fingerprint": np.str_(self.pools.fingerprint()),
        }
        for name in LIST_FIELDS:
            arrays[f"pool_{name}"] = np.asarray(getattr(self.pools, name), dtype=np.str_)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return atomic_write(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Population:
        """Read a population written by :meth:`save` (no pickle; pools are restored from the file)."""
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"population file {path} does not exist; pass the path given to save()")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError) as err:
            raise CheckpointError(f"{path} is not a readable population .npz ({err}); regenerate it") from err
        if int(data.get("format_version", -1)) != FORMAT_VERSION:
            raise CheckpointError(f"{path} has an unknown format version; regenerate it with this factlens")
        pools = Pools(
            **{name: tuple(str(x) for x in data[f"pool_{name}"]) for name in LIST_FIELDS},
            years=tuple(int(y) for y in data["years"]),
            days=int(data["days"]) if "days" in data else N_DAYS,  # files from before the date pool could be cut
        )
        if pools.fingerprint() != str(data["pools_fingerprint"]):
            raise CheckpointError(f"{path} is corrupt (pool fingerprint mismatch); regenerate it")
        return cls(
            names=data["names"],
            values=data["values"],
            train_templates=data["train_templates"],
            eval_templates=data["eval_templates"],
            pools=pools,
            seed=int(data["seed"]),
        )

    def fingerprint(self) -> str:
        """Short sha256 of who the people are (names, values, template splits, pools); computed once.

        Two populations with equal fingerprints are the same people (:meth:`equals`); runs record it in every
        checkpoint so that readers can check they rebuilt the people the run was trained on.

        Example:
            >>> from factlens.bios import Population
            >>> a, b = Population.generate(8, seed=0), Population.generate(8, seed=1)
            >>> a.fingerprint() == Population.generate(8, seed=0).fingerprint(), a.fingerprint() == b.fingerprint()
            (True, False)
        """
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            h = hashlib.sha256(self.pools.fingerprint().encode())
            for name in ("names", "values", "train_templates", "eval_templates"):
                array = np.ascontiguousarray(getattr(self, name), dtype=np.int64)
                h.update(f"{name}{array.shape}".encode() + array.tobytes())
            cached = h.hexdigest()[:16]
            object.__setattr__(self, "_fingerprint", cached)
        return cached

    def equals(self, other: Population) -> bool:
        """True when both populations hold identical arrays and pools."""
        return self.pools.fingerprint() == other.pools.fingerprint() and all(
            np.array_equal(getattr(self, k), getattr(other, k))
            for k in ("names", "values", "train_templates", "eval_templates")
        )


def _unique_codes(rng: np.random.Generator, n: int, space: int, taken: np.ndarray) -> np.ndarray:
    """``n`` distinct name codes in ``[0, space)`` not in ``taken``, drawn uniformly, first draws kept."""
    if n > (space - len(taken)) // 4:  # dense: rejection would loop long, sample without replacement
        pool = np.setdiff1d(np.arange(space, dtype=np.int64), taken, assume_unique=True)
        return rng.permutation(pool)[:n]
    codes = np.empty(0, np.int64)
    while len(codes) < n:
        draw = rng.integers(0, space, n - len(codes), dtype=np.int64)
        merged = np.concatenate([codes, draw])
        _, first = np.unique(merged, return_index=True)
        keep = np.zeros(len(merged), bool)
        keep[first] = True
        if len(taken):
            keep &= ~np.isin(merged, taken)
        codes = merged[keep]  # earlier draws win a collision; order of first draws is preserved
    return codes


__all__ = ["DEFAULT_TRAIN_TEMPLATES", "Population"]
