"""Zucchet et al. (2025) §2.2: attention-pattern patching, in training and in evaluation.

- :mod:`~factlens.bios.patching.config`: :class:`~factlens.bios.patching.config.PatchConfig`, which reference
  checkpoint, from which step, which layers and heads.
- :mod:`~factlens.bios.patching.training`: the training-time patcher (a frozen reference's patterns replace the
  trained model's, with stop-gradient) and the pattern recorder it shares with the references.
- :mod:`~factlens.bios.patching.references`: where patterns come from (a checkpoint, any model, a callable, a hub
  revision) and :func:`~factlens.bios.patching.references.patched_forward` for evaluation.
- :mod:`~factlens.bios.patching.grid`: the reference-step × start-step grid of patched training runs.
- :mod:`~factlens.bios.patching.circuits`: attention to the name over training (name-grouping and extraction).
"""
