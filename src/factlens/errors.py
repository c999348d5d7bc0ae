"""factlens's exception types.

Every error factlens raises on bad input is a :class:`FactlensError` subclass whose message names the fix.
They also subclass the matching builtin (``ValueError``, ``KeyError``, ``RuntimeError``) so code that
catches builtins keeps working.

Example:
    >>> import factlens
    >>> try:
    ...     factlens.load("gpt5")
    ... except factlens.UnknownModelError as err:
    ...     print("Supported" in str(err))
    True
"""

from __future__ import annotations


class FactlensError(Exception):
    """Base class of every factlens error."""


class UnknownModelError(FactlensError, ValueError):
    """A model name factlens does not support."""


class TokenizationError(FactlensError, ValueError):
    """A string that must be one token is not, or a prompt lacks a required token."""


class HookDidNotFireError(FactlensError, RuntimeError):
    """An intervention's hook never ran during the forward pass."""


class InterventionNoEffectError(FactlensError, RuntimeError):
    """An intervention's hook ran but left its tensor unchanged."""


class ShapeError(FactlensError, ValueError):
    """A tensor of the wrong shape, dtype, device or value range."""


class ArchitectureMismatchError(FactlensError, ValueError):
    """Two models (or a model and a checkpoint) whose architectures differ."""


class CheckpointError(FactlensError, RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or of the wrong kind."""


class ConfigError(FactlensError, ValueError):
    """A configuration value that is out of range or inconsistent."""


class EmptyDatasetError(FactlensError, ValueError):
    """A dataset or prompt list with nothing in it."""


class ModeError(FactlensError, RuntimeError):
    """A model in the wrong mode (train vs eval) or on the wrong device."""


class ResourceError(FactlensError, MemoryError):
    """A predicted allocation (a cache, a training run) that would not fit in the memory available."""


class StorageError(FactlensError, OSError):
    """A write that failed for lack of disk space or permission (the message names the path and the space)."""


class DivergenceError(FactlensError, FloatingPointError):
    """Training produced a non-finite loss or weights (the message names the settings to change)."""


class MissingDependencyError(FactlensError, ImportError):
    """An optional feature whose package or program is not installed (the message names what to install)."""


class ClusterError(FactlensError, RuntimeError):
    """A scheduler (SLURM) that refused or could not take a submission (the message quotes its reason)."""


class RunNotFoundError(CheckpointError, FileNotFoundError):
    """A directory that is not a training run, or a run without the file asked for."""


class IllConditionedWarning(UserWarning):
    """A least-squares fit whose normal matrix is nearly singular: its coefficients are unstable."""


__all__ = [
    "ArchitectureMismatchError",
    "CheckpointError",
    "ClusterError",
    "ConfigError",
    "DivergenceError",
    "EmptyDatasetError",
    "FactlensError",
    "HookDidNotFireError",
    "IllConditionedWarning",
    "InterventionNoEffectError",
    "MissingDependencyError",
    "ModeError",
    "ResourceError",
    "RunNotFoundError",
    "ShapeError",
    "StorageError",
    "TokenizationError",
    "UnknownModelError",
]
