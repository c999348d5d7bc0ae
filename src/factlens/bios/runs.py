"""Open a biography run's checkpoints as TransformerLens bridges, with the run's own task tokenizer.

Example:
    >>> from factlens.bios.runs import load_bridge, run_population
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
from factlens.errors import CheckpointError
from factlens.models import bridge_from_hf


def checkpoint_path(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint directory of ``step`` (default: the last) in a run."""
    root = Path(run_dir) / "checkpoints"
    steps = list_checkpoints(root)
    if not steps:
        raise CheckpointError(f"{run_dir} has no checkpoints; train it first (factlens bios train --out {run_dir}).")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise CheckpointError(f"{run_dir} has no checkpoint at step {step}; available: {steps}")
    return step_dir(root, step)


def run_config(run_dir: str | Path):
    """The :class:`~factlens.bios.trainer.TrainConfig` a run was trained with."""
    return TrainConfig.from_dict(json.loads((Path(run_dir) / "config.json").read_text()))


def run_population(run_dir: str | Path) -> tuple[Population, BiosVocab]:
    """Regenerate a run's population and vocabulary (deterministic from its config)."""
    config = run_config(run_dir)
    population = Population.generate(config.n_people, seed=config.data_seed, pools=config.make_pools())
    return population, BiosVocab(population.pools)


def load_hf(run_dir: str | Path, step: int | None = None, device: str | torch.device = "cpu"):
    """The plain HF model of a run's checkpoint."""
    return load_checkpoint(checkpoint_path(run_dir, step)).build_model(device).eval()


def load_bridge(run_dir: str | Path, step: int | None = None, device: str | torch.device = "cpu",
                compat: bool = True):
    """A prepared TransformerLens bridge of a run's checkpoint, with the task tokenizer.

    Compatibility mode is on by default, as the Lv analyses of :mod:`factlens.testbeds` require; it changes no
    logits."""
    _, vocab = run_population(run_dir)
    return bridge_from_hf(load_hf(run_dir, step, device), vocab.hf_tokenizer(), compat=compat, copy_model=False)
