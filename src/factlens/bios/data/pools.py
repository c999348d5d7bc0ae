"""Value pools of the synthetic biographies: names, cities, universities, majors, companies, dates.

The default pools have the sizes of Zucchet et al. (2025): 900 first/middle names, 1,000 last names,
800 cities (birth place and current location), 200 universities, 100 majors, 500 companies, and birth
dates day 1–31 × month 1–12 × year 1900–2100 (74,772 values). The lists ship as plain text files in
``factlens/data/bios`` (sources and licences in ``SOURCES.md`` beside them).

A birth date is stored as one flat index ``(year * 12 + month) * days + day`` (all zero-based; ``days`` is the
number of days of the month in the pool, 31 by default) so that every attribute is an integer index into its
pool; :meth:`Pools.date_parts` splits it again.

Example:
    >>> from factlens.bios.data.pools import Pools, no_knowledge_baseline
    >>> pools = Pools.default()
    >>> len(pools.first_names), pools.pool_size("birth_date")
    (900, 74772)
    >>> round(no_knowledge_baseline(pools), 3)
    6.785
    >>> pools.render("birth_date", pools.date_index(day=16, month=3, year=2042))
    'March 16, 2042'
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from factlens.errors import ConfigError

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "bios"

ATTRIBUTES: tuple[str, ...] = (
    "birth_date",
    "birth_place",
    "university",
    "major",
    "company",
    "current_location",
)
"""The six attribute types, in the order used by every array in ``factlens.bios`` (index 0..5)."""
N_ATTR = len(ATTRIBUTES)

MONTHS: tuple[str, ...] = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
N_DAYS = 31
PAPER_YEARS: tuple[int, ...] = tuple(range(1900, 2101))

#: Pool field that holds each attribute's values (birth date has no list).
ATTRIBUTE_FIELD: dict[str, str | None] = {
    "birth_date": None,
    "birth_place": "cities",
    "university": "universities",
    "major": "majors",
    "company": "companies",
    "current_location": "cities",
}
LIST_FIELDS: tuple[str, ...] = ("first_names", "last_names", "cities", "universities", "majors", "companies")
PAPER_SIZES: dict[str, int] = {
    "first_names": 900,
    "last_names": 1000,
    "cities": 800,
    "universities": 200,
    "majors": 100,
    "companies": 500,
}

ITEM_RE = re.compile(r"^[A-Za-z](?:[A-Za-z ,'&-]*[A-Za-z])?$")
NAME_RE = re.compile(r"^[A-Z][A-Za-z]+$")


def attribute_index(attr: str | int | np.integer) -> int:
    """Index 0..5 of an attribute given by name or index.

    Example:
        >>> from factlens.bios import attribute_index
        >>> attribute_index("major"), attribute_index(5)
        (3, 5)
    """
    if isinstance(attr, (int, np.integer)) and 0 <= int(attr) < len(ATTRIBUTES):
        return int(attr)
    if attr in ATTRIBUTES:
        return ATTRIBUTES.index(attr)
    raise ConfigError(f"unknown attribute {attr!r}; pass one of {ATTRIBUTES} or an index 0..5")


def _check_items(name: str, items: tuple[str, ...]) -> None:
    pattern = NAME_RE if name in ("first_names", "last_names") else ITEM_RE
    if not items:
        raise ConfigError(f"pool {name!r} is empty; pass at least one item")
    bad = [
        x for x in items if not (isinstance(x, str) and x.isascii() and pattern.match(x) and "  " not in x)
    ]
    if bad:
        raise ConfigError(
            f"pool {name!r} has items the task tokenizer cannot take cleanly: {bad[:5]}; "
            f"use plain ASCII letters, single spaces and , ' & - only"
        )
    if len(set(items)) != len(items):
        dup = sorted({x for x in items if items.count(x) > 1})
        raise ConfigError(f"pool {name!r} repeats items {dup[:5]}; make every item unique")


@dataclass(frozen=True)
class Pools:
    """The value lists every synthetic person draws from.

    Attributes:
        first_names: First (and middle) names, one shared list.
        last_names: Surnames.
        cities: Cities, used for both ``birth_place`` and ``current_location``.
        universities: University names.
        majors: Academic majors.
        companies: Company names.
        years: Birth years (months are January..December).
        days: Days of the month in the pool, ``1..days`` (default 31). In a date pool much larger than the
            population almost every person has a date of their own, and small models memorise those
            unshared dates long before any other attribute, which erodes the plateau of small runs; the CPU
            demo therefore cuts the date pool to 24 dates (``Pools.sized(years=1, days=2)``).

    Example:
        >>> from factlens.bios import Pools
        >>> small = Pools.sized(first_names=10, last_names=10, cities=5, universities=4, majors=3,
        ...                     companies=2, years=3)
        >>> small.pool_size("birth_place"), small.pool_size("birth_date")
        (5, 1116)
    """

    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    cities: tuple[str, ...]
    universities: tuple[str, ...]
    majors: tuple[str, ...]
    companies: tuple[str, ...]
    years: tuple[int, ...] = field(default=PAPER_YEARS)
    days: int = N_DAYS

    def __post_init__(self) -> None:
        for name in LIST_FIELDS:
            object.__setattr__(self, name, tuple(getattr(self, name)))
            _check_items(name, getattr(self, name))
        years = tuple(int(y) for y in self.years)
        if not years or len(set(years)) != len(years) or min(years) < 0:
            raise ConfigError(
                f"years must be distinct non-negative integers, got {self.years!r}; "
                f"pass e.g. years=tuple(range(1900, 2101))"
            )
        object.__setattr__(self, "years", years)
        if isinstance(self.days, bool) or not isinstance(self.days, (int, np.integer)) or not 1 <= self.days <= N_DAYS:
            raise ConfigError(f"days={self.days!r}; pass the number of days of the month in the pool, 1..{N_DAYS}")
        object.__setattr__(self, "days", int(self.days))

    @classmethod
    def default(cls) -> Pools:
        """The paper-sized pools loaded from the shipped data files (cached)."""
        return _default_pools()

    @classmethod
    def sized(
        cls,
        first_names: int = 900,
        last_names: int = 1000,
        cities: int = 800,
        universities: int = 200,
        majors: int = 100,
        companies: int = 500,
        years: int | None = None,
        days: int = N_DAYS,
    ) -> Pools:
        """Smaller pools made of the first items of each default list (for tests and toy runs).

        Args:
            first_names, last_names, cities, universities, majors, companies: How many items to keep.
            years: Keep the first this-many years from 1900 (``None``: all 201).
            days: Keep days ``1..days`` of every month (default all 31).

        Example:
            >>> from factlens.bios import Pools
            >>> Pools.sized(cities=3).cities
            ('Shanghai', 'Beijing', 'Shenzhen')
        """
        base = cls.default()
        wanted = {
            "first_names": first_names,
            "last_names": last_names,
            "cities": cities,
            "universities": universities,
            "majors": majors,
            "companies": companies,
        }
        kept = {}
        for name, n in wanted.items():
            full = getattr(base, name)
            if not 1 <= n <= len(full):
                raise ConfigError(f"{name}={n} is out of range; pass 1 <= {name} <= {len(full)}")
            kept[name] = full[:n]
        n_years = len(base.years) if years is None else years
        if not 1 <= n_years <= len(base.years):
            raise ConfigError(f"years={years} is out of range; pass 1 <= years <= {len(base.years)} or None")
        return cls(**kept, years=base.years[:n_years], days=days)

    # --- sizes -------------------------------------------------------------------------------------
    def pool_size(self, attr: str | int | np.integer) -> int:
        """Number of distinct values of an attribute (birth date: days × 12 × number of years)."""
        name = ATTRIBUTE_FIELD[ATTRIBUTES[attribute_index(attr)]]
        if name is None:
            return self.days * len(MONTHS) * len(self.years)
        return len(getattr(self, name))

    @property
    def pool_sizes(self) -> tuple[int, ...]:
        """Pool size of each attribute, in :data:`ATTRIBUTES` order."""
        return tuple(self.pool_size(a) for a in ATTRIBUTES)

    @property
    def n_names(self) -> int:
        """Number of distinct full names (first × middle × last)."""
        return len(self.first_names) ** 2 * len(self.last_names)

    def fingerprint(self) -> str:
        """Short sha256 of all pool contents; equal pools have equal fingerprints (computed once)."""
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            h = hashlib.sha256()
            for f in fields(self):
                if f.name == "days":  # hashed only when cut, so the fingerprints of 31-day pools are unchanged
                    if self.days != N_DAYS:
                        h.update(b"days\0" + str(self.days).encode() + b"\1")
                    continue
                h.update(
                    f.name.encode() + b"\0" + "\n".join(map(str, getattr(self, f.name))).encode() + b"\1"
                )
            cached = h.hexdigest()[:16]
            object.__setattr__(self, "_fingerprint", cached)
        return cached

    # --- values ------------------------------------------------------------------------------------
    def values(self, attr: str | int | np.integer) -> tuple[str, ...]:
        """The value list of a non-date attribute."""
        name = ATTRIBUTE_FIELD[ATTRIBUTES[attribute_index(attr)]]
        if name is None:
            raise ConfigError("birth dates have no value list; use render('birth_date', index) or date_parts")
        return getattr(self, name)

    def date_index(self, day: int | np.integer, month: int | np.integer, year: int | np.integer) -> int:
        """Flat birth-date index of a calendar date (day 1..days, month 1..12, year in ``years``)."""
        if not (1 <= day <= self.days and 1 <= month <= 12 and year in self.years):
            raise ConfigError(
                f"date {day}/{month}/{year} is outside the pool; pass day 1..{self.days}, month 1..12, "
                f"year {self.years[0]}..{self.years[-1]}"
            )
        return int((self.years.index(year) * 12 + month - 1) * self.days + day - 1)

    def date_parts(self, index: np.ndarray | int | np.integer) -> tuple[np.ndarray | np.integer, ...]:
        """Split flat date indices into zero-based (day, month, year) indices (vectorised; numpy scalars for a
        scalar index)."""
        index = np.asarray(index)
        return index % self.days, (index // self.days) % 12, index // (self.days * 12)

    def render(self, attr: str | int | np.integer, index: int) -> str:
        """The text of value ``index`` of an attribute, e.g. ``'March 16, 2042'`` or ``'Tokyo'``."""
        a = attribute_index(attr)
        if not 0 <= int(index) < self.pool_size(a):
            raise ConfigError(
                f"value index {index} is out of range for {ATTRIBUTES[a]}; "
                f"pass 0 <= index < {self.pool_size(a)}"
            )
        if ATTRIBUTES[a] == "birth_date":
            d, m, y = (int(x) for x in self.date_parts(int(index)))
            return f"{MONTHS[m]} {d + 1}, {self.years[y]}"
        return self.values(a)[int(index)]


def _read_list(stem: str) -> tuple[str, ...]:
    path = DATA_DIR / f"{stem}.txt"
    if not path.exists():
        raise ConfigError(
            f"pool file {path} is missing; reinstall factlens or rerun scripts/build_bios_pools.py"
        )
    return tuple(line for line in path.read_text(encoding="ascii").splitlines() if line)


@functools.cache
def _default_pools() -> Pools:
    pools = Pools(**{name: _read_list(name) for name in LIST_FIELDS})
    for name, n in PAPER_SIZES.items():
        if len(getattr(pools, name)) != n:
            raise ConfigError(
                f"{DATA_DIR / name}.txt has {len(getattr(pools, name))} items, expected {n}; "
                f"rerun scripts/build_bios_pools.py"
            )
    return pools


def pool_size(attr: str | int | np.integer, pools: Pools | None = None) -> int:
    """Pool size of an attribute (default pools unless ``pools`` is given).

    Example:
        >>> from factlens.bios import pool_size
        >>> pool_size("company")
        500
    """
    return (pools or Pools.default()).pool_size(attr)


def no_knowledge_baseline(pools: Pools | None = None) -> float:
    """Best attribute loss (nats) without knowing anyone: mean over the 6 attributes of ln(pool size).

    With the paper's pool sizes this is (2 ln 800 + ln 200 + ln 100 + ln 500 + ln 74772) / 6 ≈ 6.785.

    Example:
        >>> from factlens.bios import Pools, no_knowledge_baseline
        >>> round(no_knowledge_baseline(Pools.default()), 3)
        6.785
    """
    pools = pools or Pools.default()
    return sum(math.log(pools.pool_size(a)) for a in ATTRIBUTES) / len(ATTRIBUTES)


__all__ = [
    "ATTRIBUTES",
    "MONTHS",
    "N_ATTR",
    "PAPER_SIZES",
    "Pools",
    "attribute_index",
    "no_knowledge_baseline",
    "pool_size",
]
