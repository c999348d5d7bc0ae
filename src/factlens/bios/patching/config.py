"""Attention patching's configuration (Zucchet et al. 2025 §2.2): which reference, which step, which heads.

Example:
    >>> cfg = PatchConfig(reference="runs/ref", reference_step=8000, start_patching=0)
    >>> cfg.layers is None, cfg.reset_optimizer
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from factlens.checkpoints import MANIFEST, list_checkpoints, load_checkpoint, step_dir
from factlens.errors import CheckpointError, ConfigError


def _is_step(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def reference_checkpoint(reference: str | Path, step: int | None = None) -> Path:
    """The checkpoint directory a reference names: a checkpoint directory, or a run directory's checkpoint at ``step``.

    Refuses, naming the fix: a path that does not exist or holds no checkpoints, a run directory without
    ``step``, a step the run has not saved (saying how far a run still being written has got), and a
    checkpoint directory paired with another ``step``.

    Example:
        >>> reference_checkpoint("runs/ref", 10)                          # doctest: +SKIP
        PosixPath('runs/ref/checkpoints/step_0000010')
    """
    path = Path(reference)
    if (path / MANIFEST).exists():
        own = load_checkpoint(path, verify=False, load_tensors=False).step
        if step is not None and step != own:
            raise ConfigError(f"reference_step={step} but {path} is the checkpoint of step {own}; drop reference_step, "
                              f"or pass the run directory ({path.parent.parent}) with reference_step={step}.")
        return path
    if not path.is_dir():
        raise CheckpointError(f"the reference {path} does not exist; pass a run directory trained by factlens "
                              "(factlens bios train --out DIR) or one of its checkpoints/step_NNNNNNN directories.")
    root = path / "checkpoints"
    steps = list_checkpoints(root)
    if not steps:
        raise CheckpointError(f"the reference {path} holds no checkpoints; pass a run directory trained by factlens "
                              "(factlens bios train --out DIR), or wait until it has saved its first checkpoint.")
    if step is None:
        raise ConfigError(f"{path} is a run directory; pass reference_step (--reference-step) to choose one of its "
                          f"checkpoints: {steps}.")
    if step not in steps:
        total = load_checkpoint(step_dir(root, steps[-1]), verify=False, load_tensors=False).config.get("steps")
        if total is not None and steps[-1] < total and step <= total:
            raise CheckpointError(f"{path} has no checkpoint at step {step} yet: the run has reached step {steps[-1]} "
                                  f"of {total} (still training, or interrupted). Let it finish (factlens bios train "
                                  f"resumes it) and retry, or pick a saved step; available: {steps}")
        raise CheckpointError(f"{path} has no checkpoint at step {step}; pick a step on its checkpoint schedule, "
                              f"available: {steps}")
    return step_dir(root, step)


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


@dataclass
class PatchConfig:
    """Attention patching from a reference checkpoint (Zucchet et al. §2.2).

    Every field is checked when the config is built, and :meth:`check_steps` checks ``start_patching``
    against the run's length; the reference itself (it exists, has the checkpoint, has this architecture)
    is checked by the trainer before step 0.

    Example:
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
    """

    reference: str
    reference_step: int | None = None
    start_patching: int = 0
    layers: list[int] | None = None
    heads: list[int] | None = None
    reset_optimizer: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.reference, Path):
            self.reference = str(self.reference)
        if not isinstance(self.reference, str) or not self.reference:
            raise ConfigError(f"reference={self.reference!r}: pass the reference run directory (or one of its "
                              "checkpoints/step_NNNNNNN directories).")
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

    def checkpoint_dir(self) -> Path:
        """The reference checkpoint's directory (see :func:`reference_checkpoint`)."""
        return reference_checkpoint(self.reference, self.reference_step)


__all__ = ["PatchConfig", "reference_checkpoint"]
