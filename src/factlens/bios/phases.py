"""The three phases of knowledge acquisition (Zucchet et al. 2025 §2): two named readings of one loss curve.

A run's attribute loss first drops to the no-knowledge baseline, then sits on a plateau near it, then falls as
the facts are learnt. Zucchet et al. do not define where the phases begin and end, so factlens reads them in two
documented ways, both here and nowhere else:

- **Band reading** (:func:`three_phases`, the demo's rule): the plateau is the longest unbroken stretch of
  checkpoints whose loss is within ``±band`` (default 3%) of the baseline. ``factlens demo`` and its figure
  use it, and its ``--check`` asserts the plateau lasts at least as long as the drop.
- **Ratio reading** (:func:`drop_end`, :func:`plateau_end`, :func:`ratio_phases`): the drop ends at the first
  checkpoint within 10% of the baseline, and the plateau ends at the first checkpoint after it whose loss is
  below ``ratio × baseline`` (default 0.98, which reproduces the paper's plotted plateau ends within about 5%).
  :meth:`~factlens.bios.history.TrainingHistory.plateau_end`, the patching grid, the reproduction's scaling
  law and the mechanisms figure use it.

The two readings answer different questions (how long the loss stays flat; when knowledge starts to show), so
their plateau ends differ; each figure names the one it draws.

Example:
    >>> from factlens.bios.phases import ratio_phases
    >>> steps, losses = [0, 100, 200, 300, 400], [40.0, 6.9, 6.8, 6.7, 3.0]
    >>> ratio_phases(steps, losses, baseline=6.785)
    (100, 400)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from factlens.errors import ConfigError, ShapeError

NEAR = 1.1  # the drop ends at the first loss below NEAR × baseline


def _curve(steps, losses) -> tuple[np.ndarray, np.ndarray]:
    steps, losses = np.asarray(steps), np.asarray(losses, dtype=np.float64)
    if steps.shape != losses.shape or steps.ndim != 1:
        raise ShapeError(f"steps {steps.shape} and losses {losses.shape} must be 1-d of equal length")
    order = np.argsort(steps, kind="stable")
    return steps[order], losses[order]


def drop_end(steps: Sequence[int] | np.ndarray, losses: Sequence[float] | np.ndarray, baseline: float) -> int | None:
    """Ratio reading: the first checkpoint whose attribute loss is within 10% of the baseline; ``None`` if never.

    Example:
        >>> from factlens.bios.phases import drop_end
        >>> drop_end([0, 100, 200], [40.0, 7.0, 6.8], baseline=6.785)
        100
    """
    steps, losses = _curve(steps, losses)
    hit = np.nonzero(losses < NEAR * baseline)[0]
    return int(steps[hit[0]]) if len(hit) else None


def check_plateau_ratio(ratio: float) -> float:
    """``ratio`` if it is a number in (0, 1) (the plateau ends when the loss drops below ``ratio × baseline``).

    Example:
        >>> from factlens.bios.phases import check_plateau_ratio
        >>> check_plateau_ratio(98)
        Traceback (most recent call last):
        ...
        factlens.errors.ConfigError: plateau ratio 98 is not in (0, 1): the plateau ends when the loss falls below ratio × baseline, so a ratio >= 1 ends it at once and <= 0 never. Pass a fraction such as 0.98 (not a percentage).
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating)) or not math.isfinite(ratio) \
            or not 0 < ratio < 1:
        raise ConfigError(f"plateau ratio {ratio!r} is not in (0, 1): the plateau ends when the loss falls below ratio "
                          "× baseline, so a ratio >= 1 ends it at once and <= 0 never. Pass a fraction such as 0.98 "
                          "(not a percentage).")
    return float(ratio)


def plateau_end(
    steps: Sequence[int] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    baseline: float,
    ratio: float = 0.98,
    min_step: int = 200,
) -> int | None:
    """Ratio reading: the first step ``>= min_step`` whose attribute loss is below ``ratio × baseline``.

    ``None`` if never. ``ratio=0.98`` reproduces Zucchet et al.'s plotted plateau ends within about 5% (see the
    paper notes, §2). The order of the input does not matter.

    Example:
        >>> from factlens.bios import plateau_end
        >>> plateau_end([0, 100, 300, 500], [40.0, 6.8, 6.8, 6.0], baseline=6.785)
        500
    """
    steps, losses = _curve(steps, losses)
    check_plateau_ratio(ratio)
    if not (isinstance(baseline, (int, float, np.floating)) and math.isfinite(baseline) and baseline > 0):
        raise ConfigError(f"baseline={baseline}; pass the (positive) no-knowledge loss of the population")
    hit = np.nonzero((steps >= min_step) & (losses < ratio * baseline))[0]
    return int(steps[hit[0]]) if len(hit) else None


def ratio_phases(steps: Sequence[int] | np.ndarray, losses: Sequence[float] | np.ndarray, baseline: float,
                 ratio: float = 0.98, min_step: int | None = None) -> tuple[int | None, int | None]:
    """Ratio reading of a curve: ``(drop_end, plateau_end)``.

    ``min_step`` defaults to :func:`drop_end` (0 when the loss never comes near the baseline), so a loss that
    starts below ``ratio × baseline`` is not mistaken for knowledge.

    Example:
        >>> from factlens.bios.phases import ratio_phases
        >>> ratio_phases([0, 100, 200, 300], [40.0, 6.8, 6.8, 5.0], baseline=6.785)
        (100, 300)
    """
    drop = drop_end(steps, losses, baseline)
    start = min_step if min_step is not None else (drop if drop is not None else 0)
    return drop, plateau_end(steps, losses, baseline, ratio=ratio, min_step=start)


def three_phases(history, band: float = 0.03) -> dict:
    """Band reading: the demo's three phases from a run's evaluations (drop, plateau, emergence).

    The plateau is the longest unbroken stretch of checkpoints within ``±band`` of the no-knowledge baseline
    (the earliest such stretch on a tie). ``drop_end`` is where it starts, so the drop lasts until the loss has
    settled in the band; ``first_in_band`` is the first checkpoint in the band at all (the same step unless
    the loss touched the band and left it again before settling). ``plateau_end`` is the stretch's last
    checkpoint and ``final_acc`` the last accuracy. The demo's claim is ``plateau_steps >= drop_end`` (the
    plateau lasts at least as long as the drop took, however the drop is read, since ``drop_end >=
    first_in_band``) and ``final_acc >= 0.8``.

    Args:
        history: a :class:`~factlens.bios.history.TrainingHistory` (or anything with ``evals`` holding
            ``step``, ``attr_loss`` and ``attr_acc``, and ``baseline``).
        band: the plateau's half-width, as a fraction of the baseline.

    Example:
        >>> import pandas as pd
        >>> from types import SimpleNamespace
        >>> from factlens.bios import three_phases
        >>> ev = pd.DataFrame({"step": [0, 100, 200, 300, 400, 500, 600], "attr_acc": [0, 0, 0, 0, 0, 0.1, 0.9],
        ...                    "attr_loss": [14, 4.9, 5.2, 4.85, 4.9, 4.95, 1.0]})
        >>> three_phases(SimpleNamespace(evals=ev, baseline=4.9))
        {'drop_end': 300, 'plateau_end': 500, 'plateau_steps': 200, 'first_in_band': 100, 'final_acc': 0.9, 'band': 0.03}
    """
    ev, base = history.evals, history.baseline
    steps, loss = ev["step"].tolist(), ev["attr_loss"].tolist()
    inside = [abs(v / base - 1) <= band for v in loss]
    final_acc = float(ev["attr_acc"].iloc[-1])
    if True not in inside:
        return {"drop_end": None, "plateau_end": None, "plateau_steps": 0, "first_in_band": None,
                "final_acc": final_acc, "band": band}
    runs, i = [], 0  # (first, last) index pairs of unbroken in-band stretches
    for in_band, group in itertools.groupby(inside):
        n = len(list(group))
        if in_band:
            runs.append((i, i + n - 1))
        i += n
    i, j = max(runs, key=lambda r: (steps[r[1]] - steps[r[0]], -r[0]))
    return {"drop_end": int(steps[i]), "plateau_end": int(steps[j]), "plateau_steps": int(steps[j] - steps[i]),
            "first_in_band": int(steps[runs[0][0]]), "final_acc": final_acc, "band": band}


__all__ = ["NEAR", "check_plateau_ratio", "drop_end", "plateau_end", "ratio_phases", "three_phases"]
