"""What fine-tuning on new (or rare, already-seen) people does to old knowledge (Zucchet et al. §4).

:func:`forgetting_summary` reads a fine-tuning run's old/new curves (the run is built by
:func:`factlens.bios.finetune.finetune_config`).

Example:
    >>> from factlens.bios.finetune import finetune_config
    >>> from factlens.bios.forgetting import forgetting_summary
    >>> from factlens.bios.trainer import train
    >>> config = finetune_config("runs/paper", n_new=4000, old_weight=1 / 32, steps=4000)  # doctest: +SKIP
    >>> forgetting_summary(train(config, "runs/finetune"))                                  # doctest: +SKIP
"""

from __future__ import annotations

from factlens.errors import ConfigError


def forgetting_summary(history, early_fraction: float = 0.1) -> dict:
    """The headline numbers of a fine-tuning run's curves.

    Returns ``old_acc_start``; ``old_acc_early``, the lowest old accuracy at the evaluations after the start
    within the first ``early_fraction`` of the run, and ``early_step``, its step; ``old_acc_min`` over the whole
    run and its step; ``old_acc_end``; ``new_acc_start``, ``new_acc_early`` (at the last evaluation within the
    first ``early_fraction``; the first evaluation after the start stands in for the window when none falls in
    it), ``new_acc_end``, ``new_acc_half_step`` (first step with new accuracy >= 0.5, or
    ``None``); and the unseen people's ``unseen_top_prob_end``/``unseen_entropy_end`` when logged.

    Example:
        >>> import pandas as pd
        >>> from types import SimpleNamespace
        >>> from factlens.bios.forgetting import forgetting_summary
        >>> ev = pd.DataFrame({"step": [0, 5, 10, 50, 100], "old_attr_acc": [0.9, 0.3, 0.35, 0.2, 0.4],
        ...                    "new_attr_acc": [0.0, 0.05, 0.1, 0.6, 0.9]})
        >>> s = forgetting_summary(SimpleNamespace(evals=ev))
        >>> s["old_acc_early"], s["early_step"], s["new_acc_early"], s["old_acc_min"], s["new_acc_half_step"]
        (0.3, 5, 0.1, 0.2, 50)
    """
    ev = history.evals.sort_values("step")
    if "old_attr_acc" not in ev or "new_attr_acc" not in ev:
        raise ConfigError("this run has no old/new people evaluations; pass the history of a fine-tuning run "
                          "(factlens bios finetune).")
    steps = ev["step"].to_numpy()
    window = ev[(steps > steps[0]) & (steps <= steps[0] + early_fraction * (steps[-1] - steps[0]))]
    if window.empty:  # evaluated too rarely: the first evaluation after the start stands in (see early_step)
        window = ev.iloc[1:2] if len(ev) > 1 else ev.iloc[:1]
    first = window.loc[window["old_attr_acc"].idxmin()]
    early = window.iloc[-1]
    low = ev["old_attr_acc"].idxmin()
    half = ev.loc[ev["new_attr_acc"] >= 0.5, "step"]
    out = {"old_acc_start": float(ev["old_attr_acc"].iloc[0]), "old_acc_early": float(first["old_attr_acc"]),
           "early_step": int(first["step"]), "old_acc_min": float(ev.loc[low, "old_attr_acc"]),
           "old_acc_min_step": int(ev.loc[low, "step"]), "old_acc_end": float(ev["old_attr_acc"].iloc[-1]),
           "new_acc_start": float(ev["new_attr_acc"].iloc[0]), "new_acc_early": float(early["new_attr_acc"]),
           "new_acc_end": float(ev["new_attr_acc"].iloc[-1]),
           "new_acc_half_step": int(half.iloc[0]) if len(half) else None}
    for key in ("unseen_top_prob", "unseen_entropy"):
        if key in ev:
            out[key + "_end"] = float(ev[key].iloc[-1])
    return out


__all__ = ["forgetting_summary"]
