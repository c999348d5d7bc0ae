"""Open a biography run: its verified config, its checkpoints, its people, its models as TransformerLens bridges.

A run's config is the one stored in its checkpoints' manifests (every checkpoint must carry the same one);
``config.json`` is a readable copy, and a copy that disagrees with the manifests (edited by hand, or overwritten
by another run) is refused rather than trusted. Every reader (``bios eval``, ``plot``, ``attention``, the
patching references and grid) takes the config from :func:`run_config`.

Example:
    >>> from factlens.bios.runs import load_bridge, run_config, run_population
    >>> config = run_config("runs/demo")                     # doctest: +SKIP
    >>> model = load_bridge("runs/demo", step=1000)          # doctest: +SKIP
    >>> population, vocab = run_population("runs/demo")      # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from factlens.bios.config import TrainConfig
from factlens.bios.data.population import Population
from factlens.bios.data.vocab import BiosVocab
from factlens.checkpoints import list_checkpoints, load_checkpoint, step_dir
from factlens.errors import CheckpointError, RunNotFoundError
from factlens.models import bridge_from_hf

CONFIG = "config.json"
CHECKPOINTS, RESUME = "checkpoints", "resume"


def checkpoint_path(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint directory of ``step`` (default: the last) in a run."""
    root = Path(run_dir) / CHECKPOINTS
    steps = list_checkpoints(root)
    if not steps:
        raise RunNotFoundError(f"{run_dir} has no checkpoints; train it first (factlens bios train --out {run_dir}).")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise CheckpointError(f"{run_dir} has no checkpoint at step {step}; available: {steps}")
    return step_dir(root, step)


def stored_configs(run_dir: str | Path) -> dict[Path, dict]:
    """The normalised config (``TrainConfig.to_dict()``) in the manifest of every checkpoint of a run
    (``checkpoints/`` and ``resume/``), by checkpoint directory; the weights are not read."""
    out = {}
    for sub in (CHECKPOINTS, RESUME):
        for step in list_checkpoints(Path(run_dir) / sub):
            path = step_dir(Path(run_dir) / sub, step)
            raw = load_checkpoint(path, verify=False, load_tensors=False).config
            out[path] = _normalise(raw, f"the manifest of {path}")
    return out


def read_config_json(run_dir: str | Path) -> TrainConfig | None:
    """The run's ``config.json`` as a config (``None`` when there is none); another tool's file raises."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not JSON ({err}); it is corrupt or another tool's file. Restore it, or "
                              "delete it (the checkpoints' manifests hold the run's config).") from None
    return TrainConfig.from_dict(_normalise(raw, str(path)))


def _normalise(raw, where: str) -> dict:
    try:
        return TrainConfig.from_dict(raw).to_dict()
    except (TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{where} is not a biography-run config ({err}); this is not a factlens bios run "
                              "(perhaps another tool's file). Use another directory.") from None


def config_diff(a: dict, b: dict) -> list[str]:
    """The fields where two config dicts differ."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def run_config(run_dir: str | Path, *, require_checkpoint: bool = True) -> TrainConfig:
    """The :class:`~factlens.bios.config.TrainConfig` a run was trained with, from its checkpoints' manifests.

    Raises :class:`~factlens.errors.CheckpointError` when the checkpoints carry different configs (two runs
    mixed in one directory) or when ``config.json`` disagrees with them, and
    :class:`~factlens.errors.RunNotFoundError` for a directory that holds no run (with
    ``require_checkpoint=False``, a run without checkpoints yet is read from its ``config.json``).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunNotFoundError(f"run directory {run_dir} does not exist{' (it is a file)' if run_dir.exists() else ''}; "
                               "pass the --out directory of a training run.")
    stored = stored_configs(run_dir)
    distinct = {json.dumps(c, sort_keys=True): c for c in stored.values()}
    if len(distinct) > 1:
        first, *rest = distinct.values()
        raise CheckpointError(f"{run_dir} mixes checkpoints of {len(distinct)} runs (their configs differ in "
                              f"{config_diff(first, rest[0])}); keep each run in its own directory: move the stray "
                              "checkpoints out, or delete the directory and train again.")
    from_json = read_config_json(run_dir)
    if not distinct:
        if require_checkpoint or from_json is None:
            raise RunNotFoundError(f"{run_dir} has no checkpoints{'' if from_json else ' and no config.json'}; "
                                   f"train it first (factlens bios train --out {run_dir}).")
        return from_json
    (config,) = distinct.values()
    if from_json is not None and from_json.to_dict() != config:
        raise CheckpointError(f"{run_dir / CONFIG} disagrees with the config in the run's checkpoints (differs in "
                              f"{config_diff(from_json.to_dict(), config)}): it was edited or overwritten. Restore "
                              "it or delete it; the checkpoints' config is the one the run was trained with.")
    return TrainConfig.from_dict(config)


def run_population(run_dir: str | Path) -> tuple[Population, BiosVocab]:
    """Regenerate a run's population and vocabulary (deterministic from its config)."""
    config = run_config(run_dir)
    population = Population.generate(config.n_people, seed=config.data_seed, pools=config.make_pools())
    return population, BiosVocab(population.pools)


def load_hf(run_dir: str | Path, step: int | None = None, device: str | torch.device = "cpu"):
    """The plain HF model of a run's checkpoint."""
    run_config(run_dir)  # refuses a run whose checkpoints or config.json disagree
    return load_checkpoint(checkpoint_path(run_dir, step)).build_model(device).eval()


def load_bridge(run_dir: str | Path, step: int | None = None, device: str | torch.device = "cpu",
                compat: bool = True):
    """A prepared TransformerLens bridge of a run's checkpoint, with the task tokenizer.

    Compatibility mode is on by default, as the Lv analyses of :mod:`factlens.testbeds` require; it changes no
    logits."""
    _, vocab = run_population(run_dir)
    return bridge_from_hf(load_hf(run_dir, step, device), vocab.hf_tokenizer(), compat=compat, copy_model=False)


__all__ = ["checkpoint_path", "config_diff", "load_bridge", "load_hf", "read_config_json", "run_config",
           "run_population", "stored_configs"]
