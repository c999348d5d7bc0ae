"""Attention patching's configuration (Zucchet et al. 2025 §2.2): which reference, which step, which heads.

Example:
    >>> from factlens.bios import PatchConfig
    >>> cfg = PatchConfig(reference="runs/ref", reference_step=8000, start_patching=0)
    >>> cfg.layers is None, cfg.reset_optimizer
    (True, True)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from factlens.errors import ConfigError
from factlens.inputs import refuse_unknown_keys


def _is_step(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_indices(name: str, values: list[int] | None, negative_ok: bool) -> None:
    if values is None:
        return
    if not isinstance(values, (list, tuple)) or not all(_is_step(v) for v in values):
        raise ConfigError(f"{name}={values!r}: pass a list of 0-based {name} (integers), or None for all.")
    if not values:
        raise ConfigError(f"{name}=[] patches nothing; omit {name} (None) to patch all, or list the 0-based "
                          f"{name} to patch.")
    if len(set(values)) != len(values):
        raise ConfigError(f"{name}={list(values)} lists an entry twice; list each {name[:-1]} once.")
    if not negative_ok and min(values) < 0:
        raise ConfigError(f"{name}={list(values)}: {name} are 0-based indices, 0..n_{name}-1.")


@refuse_unknown_keys
@dataclass
class PatchConfig:
    """Attention patching from a reference checkpoint (Zucchet et al. §2.2).

    Every field is checked when the config is built, and :meth:`check_steps` checks ``start_patching``
    against the run's length. ``reference`` is made absolute when the config is built, so a run's stored
    config names the same folder wherever it is read from; the reference itself (it exists, has the
    checkpoint, has this architecture) is checked, and its weights' checksum pinned, by the trainer before
    step 0 (:func:`factlens.bios.run.pin_reference`), and a reference that changed since is refused.

    Example:
        >>> from factlens.bios import PatchConfig
        >>> PatchConfig(reference="runs/ref", reference_step=8000, start_patching=0).layers is None
        True
        >>> PatchConfig(reference="runs/ref", reference_step=8000, start_patching=-1)
        Traceback (most recent call last):
        ...
        factlens.errors.ConfigError: start_patching=-1 is negative; steps count from 0 (0 patches the whole run).

    Attributes:
        reference: a checkpoint directory (``.../checkpoints/step_0008000``) or a run directory, with
            ``reference_step`` picking the checkpoint.
        reference_step: the reference checkpoint's step when ``reference`` is a run directory.
        start_patching: first step trained with patched attention (0 = the whole run;
            ``== reference_step`` freezes attention at that step); below the run's ``steps``.
        layers / heads: which 0-based layers and heads to patch (default all; ``-1`` = the last layer).
        reset_optimizer: re-initialise AdamW's state when patching starts (as in the paper).
        reference_sha256: the reference checkpoint's weights' checksum, filled in when the run starts.
    """

    reference: str
    reference_step: int | None = None
    start_patching: int = 0
    layers: list[int] | None = None
    heads: list[int] | None = None
    reset_optimizer: bool = True
    reference_sha256: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.reference, Path):
            self.reference = str(self.reference)
        if not isinstance(self.reference, str) or not self.reference:
            raise ConfigError(f"reference={self.reference!r}: pass the reference run directory (or one of its "
                              "checkpoints/step_NNNNNNN directories).")
        self.reference = os.path.abspath(self.reference)  # resolved now: relative to where the config is built
        start = self.start_patching
        if not _is_step(start):
            raise ConfigError(f"start_patching={start!r} is not a step; pass a whole number >= 0 "
                              "(0 patches the whole run).")
        if start < 0:
            raise ConfigError(f"start_patching={start} is negative; steps count from 0 (0 patches the whole run).")
        step = self.reference_step
        if step is not None and (not _is_step(step) or step < 0):
            raise ConfigError(f"reference_step={step!r} is not a checkpoint step; pass a step >= 0 that the reference "
                              "run saved (or None when reference is a checkpoint directory).")
        _check_indices("layers", self.layers, negative_ok=True)
        _check_indices("heads", self.heads, negative_ok=False)
        if not isinstance(self.reset_optimizer, bool):
            raise ConfigError(f"reset_optimizer={self.reset_optimizer!r}: pass True or False.")

    def check_steps(self, steps: int) -> None:
        """Refuse a ``start_patching`` that a run of ``steps`` steps never trains at."""
        if self.start_patching >= steps:
            raise ConfigError(f"start_patching={self.start_patching} is not a training step of this {steps}-step run, "
                              f"so the run would train unpatched; use 0..{steps - 1} (0 patches the whole run), or "
                              "train for more steps.")



__all__ = ["PatchConfig"]
