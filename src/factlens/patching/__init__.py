"""Zucchet et al. (2025) §2.2: attention-pattern patching from reference checkpoints.

- :mod:`~factlens.patching.references`: where patterns come from (a checkpoint, any model, a callable, a hub
  revision) and :func:`~factlens.patching.references.patched_forward` for evaluation.
- :mod:`~factlens.patching.grid`: the reference-step × start-step grid of patched training runs.
- :mod:`~factlens.patching.circuits`: attention to the name over training (name-grouping and extraction).

The training-time patcher itself is core (:mod:`factlens.attention_patcher`), so the trainer can use it
without importing this package.
"""
