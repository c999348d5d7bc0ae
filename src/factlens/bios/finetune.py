"""Fine-tuning a trained biography model on new people, with replay of old ones (Zucchet et al. §4).

Start from a pre-training checkpoint, add ``n_new`` people never seen before (disjoint names), and train with
a constant learning rate on a :class:`~factlens.bios.data.samplers.Replay` mix: each old person has weight
``old_weight`` (0 = no replay), each new person weight 1. Old and new knowledge are evaluated separately
(``old_attr_loss``/``old_attr_acc``, ``new_attr_loss``/``new_attr_acc`` in ``metrics.jsonl``), so the fast
forgetting of old facts and the slower learning of new ones are both visible.

Example:
    >>> config = finetune_config("runs/paper", n_new=4000, old_weight=1 / 32, steps=4000)   # doctest: +SKIP
    >>> history = train(config, "runs/finetune")                                             # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from factlens.bios.data.population import Population
from factlens.bios.data.samplers import Replay
from factlens.bios.runs import checkpoint_path, run_config
from factlens.checkpoints import architecture, check_same_architecture, load_checkpoint, load_state
from factlens.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class FinetuneConfig:
    """Where fine-tuning starts and whom it adds.

    Attributes:
        init_from: a pre-training checkpoint directory (``.../checkpoints/step_0016000``).
        n_new: number of new people. old_weight: replay weight of each old person (0 = no replay).
        new_seed: seed of the new people's names, values and template splits.
    """

    init_from: str
    n_new: int = 4000
    old_weight: float = 0.0
    new_seed: int = 1_000_003


def finetune_config(run_dir: str | Path, *, step: int | None = None, n_new: int = 4000, old_weight: float = 0.0,
                    steps: int = 4000, lr: float = 3e-5, **overrides):
    """A :class:`~factlens.bios.trainer.TrainConfig` fine-tuning a run's checkpoint (constant LR, paper defaults)."""
    base = run_config(run_dir)
    ft = FinetuneConfig(init_from=str(checkpoint_path(run_dir, step)), n_new=n_new, old_weight=old_weight)
    # the sampler is set by the fine-tuning setup; the evaluation is split into old and new people
    fields = dict(steps=steps, lr=lr, min_lr=lr, finetune=dataclasses.asdict(ft), patch=None, checkpoint_every=None,
                  sampler={"kind": "replay"}, n_unseen=0)
    fields.update(overrides)
    return dataclasses.replace(base, **fields)


def setup(config, population: Population):
    """(population, sampler, eval groups) for a fine-tuning run; eval groups map a prefix to people indices."""
    ft = FinetuneConfig(**config.finetune)
    if ft.n_new < 1:
        raise ConfigError(f"n_new={ft.n_new}; fine-tuning needs at least one new person.")
    new = population.unseen(ft.n_new, seed=ft.new_seed)
    both = Population.concatenate([population, new])
    sampler = Replay(len(population), ft.n_new, ft.old_weight)
    return both, sampler, {"old_": (0, len(population)), "new_": (len(population), len(both))}


def people_slice(population: Population, lo: int, hi: int) -> Population:
    """People ``lo..hi-1`` of a population, as a population (for evaluating old and new people apart)."""
    return dataclasses.replace(population, names=population.names[lo:hi], values=population.values[lo:hi],
                               train_templates=population.train_templates[lo:hi],
                               eval_templates=population.eval_templates[lo:hi])


def init_weights(model: PreTrainedModel, config) -> None:
    """Load the pre-training checkpoint's weights into ``model`` (architectures must match)."""
    ckpt = load_checkpoint(FinetuneConfig(**config.finetune).init_from)
    check_same_architecture(ckpt.architecture, architecture(model.config), what="fine-tuning checkpoint")
    load_state(model, ckpt.state, ckpt.path)
