"""Where the two papers meet: a biography-trained model (Zucchet et al.) as a recall testbed (Lv et al.).

- :mod:`~factlens.testbeds.bios_recall`: a run's people and held-out templates as a
  :class:`~factlens.recall.datasets.RelationDataset`, so every Lv et al. analysis runs on a checkpoint.
"""
