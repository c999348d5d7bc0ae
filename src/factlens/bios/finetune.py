"""Fine-tuning a trained biography model on new people, with replay of old ones (Zucchet et al. §4).

Start from a pre-training checkpoint, add ``n_new`` people never seen before (disjoint names), and train with
a constant learning rate on a :class:`~factlens.bios.data.samplers.Replay` mix: each old person has weight
``old_weight`` (0 = no replay), each new person weight 1. Old and new knowledge are evaluated separately
(``old_attr_loss``/``old_attr_acc``, ``new_attr_loss``/``new_attr_acc`` in ``metrics.jsonl``), so the fast
forgetting of old facts and the slower learning of new ones are both visible. The old people are the
pre-training run's own (checked by their fingerprint, :class:`~factlens.bios.config.FinetuneConfig`).

Example:
    >>> from factlens.bios import train
    >>> from factlens.bios.finetune import finetune_config
    >>> config = finetune_config("runs/paper", n_new=4000, old_weight=1 / 32, steps=4000)   # doctest: +SKIP
    >>> history = train(config, "runs/finetune")                                             # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from factlens.bios.config import FinetuneConfig, TrainConfig
from factlens.bios.run import Run
from factlens.bios.task import _finetune_setup, people_slice
from factlens.checkpoints import (
    architecture,
    check_same_architecture,
    list_checkpoints,
    load_checkpoint,
    load_state,
    step_dir,
)
from factlens.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

_PEOPLE = ("n_people", "data_seed", "pools")  # what decides who the old people are


def finetune_config(run_dir: str | Path, *, step: int | None = None, n_new: int = 4000, old_weight: float = 0.0,
                    steps: int = 4000, lr: float = 3e-5, seen_from: int | None = None, keep_optimizer: bool = False,
                    **overrides) -> TrainConfig:
    """A :class:`~factlens.bios.config.TrainConfig` fine-tuning a run's checkpoint (constant LR, paper defaults).

    The old people are the run's own: overriding ``n_new``-independent fields that decide who they are
    (``n_people``, ``data_seed``, ``pools``) is refused. The old and the fine-tuning people are recorded by
    fingerprint. People never seen are evaluated too (the run's ``n_unseen``, or ``n_eval_sequences`` when it
    had none). ``seen_from``: fine-tune on the run's own people ``seen_from .. N-1`` instead of new ones (e.g. a
    celebrity run's non-celebrities). ``keep_optimizer``: carry the run's AdamW state over (its resume
    checkpoint at ``step`` must exist); by default AdamW starts afresh."""
    run = Run(run_dir)
    base = run.config
    changed = [k for k in _PEOPLE if k in overrides and overrides[k] != getattr(base, k)]
    if changed:
        raise ConfigError(f"finetune_config({run_dir!r}, {', '.join(f'{k}={overrides[k]!r}' for k in changed)}) "
                          "would build other people than the run was trained on, and measure them as old people "
                          f"the model never saw. Drop {', '.join(changed)}: the old people are the run's own.")
    if base.finetune:
        raise ConfigError(f"{run_dir} is itself a fine-tuning run; fine-tune its pre-training run "
                          f"({Path(base.finetune.init_from).parent.parent}) instead.")
    old = run.population()
    ft = FinetuneConfig(init_from=str(run.checkpoint_dir(step)), n_new=n_new, old_weight=old_weight,
                        population_sha256=old.fingerprint(), seen_from=seen_from, keep_optimizer=keep_optimizer)
    draft = dataclasses.replace(base, finetune=ft, sampler={"kind": "replay"})
    both, _, groups = _finetune_setup(draft, old)  # checks seen_from
    ft.new_population_sha256 = people_slice(both, *groups["new_"]).fingerprint()
    # the sampler is set by the fine-tuning setup; the evaluation is split into old, new and unseen people
    fields = dict(steps=steps, lr=lr, min_lr=lr, finetune=ft, patch=None, checkpoint_every=None,
                  sampler={"kind": "replay"}, n_unseen=base.n_unseen or base.n_eval_sequences)
    fields.update(overrides)
    return dataclasses.replace(base, **fields)


def pretraining_run(config: TrainConfig) -> Run:
    """The run a fine-tuning config starts from (its checkpoint's run folder)."""
    return Run(Path(config.finetune.init_from).parent.parent)


def init_weights(model: PreTrainedModel, config: TrainConfig) -> None:
    """Load the pre-training checkpoint's weights into ``model`` (architectures must match)."""
    ckpt = load_checkpoint(config.finetune.init_from)
    check_same_architecture(ckpt.architecture, architecture(model.config), what="fine-tuning checkpoint")
    load_state(model, ckpt.state, ckpt.path)


def init_optimizer(optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
    """With ``keep_optimizer``, load the base run's AdamW state at the checkpoint's step (else leave it fresh)."""
    if not config.finetune.keep_optimizer:
        return
    ckpt = Path(config.finetune.init_from)
    step = load_checkpoint(ckpt, verify=False, load_tensors=False).step
    resume_root = ckpt.parent.parent / "resume"
    if step not in list_checkpoints(resume_root):
        raise CheckpointError(f"keep_optimizer needs the base run's AdamW state at step {step}, but {resume_root} has "
                              f"resume checkpoints only at {list_checkpoints(resume_root)}; fine-tune from one of "
                              "those steps, or with a fresh optimizer (keep_optimizer=False, the default).")
    optimizer.load_state_dict(load_checkpoint(step_dir(resume_root, step)).training_state()["optimizer"])


__all__ = ["FinetuneConfig", "finetune_config", "init_optimizer", "init_weights", "pretraining_run"]
