"""Zucchet et al. (2025), *How do language models learn facts?*: synthetic biographies and the training run.

Data (:mod:`factlens.bios.data`):

- :mod:`~factlens.bios.data.pools`: value pools (900 first names, 1,000 last names, 800 cities, 200
  universities, 100 majors, 500 companies, 74,772 birth dates) and the no-knowledge baseline.
- :mod:`~factlens.bios.data.templates`: 25 templates per attribute.
- :mod:`~factlens.bios.data.population`: the people, their values and their 20/5 train/held-out template split.
- :mod:`~factlens.bios.data.vocab`: the word-level task tokenizer (HF ``tokenizers``, loadable by TransformerLens).
- :mod:`~factlens.bios.data.batches`: padded biography batches with value/name masks, a resumable sharded stream.
- :mod:`~factlens.bios.data.samplers`: uniform, power-law, celebrity, warm-up, sequential and replay samplers.

Training and reading runs:

- :mod:`~factlens.bios.metrics`: attribute loss/accuracy, hallucination metrics, plateau end.
- :mod:`~factlens.bios.config`: :class:`TrainConfig` / :class:`PatchConfig`, presets, the checkpoint schedule.
- :mod:`~factlens.bios.trainer`: :func:`train`, the fast resumable (DDP) training loop.
- :mod:`~factlens.bios.finetune`: fine-tuning on new people with replay.
- :mod:`~factlens.bios.task`: the data side of one run (people, vocabulary, stream, evaluation sets).
- :mod:`~factlens.bios.run`: :class:`Run`, the one way to open a run folder (config, checkpoints, people,
  history, evaluation) and to claim one for writing.
- :mod:`~factlens.bios.history`: a run's metrics and their figures (:mod:`~factlens.bios.metrics_log`: the log); :mod:`~factlens.bios.phases`: the phase
  rules (band and ratio readings).
- :mod:`~factlens.bios.patching`: attention patching in training and evaluation, the grid, the circuits;
  :mod:`~factlens.bios.reproduce`: the paper's headline experiments in one command.
- :mod:`~factlens.bios.cells` and :mod:`~factlens.bios.executor`: grids of training runs as cells, run here or
  as a SLURM job array through submitit (docs/cluster.md).

Example:
    >>> from factlens.bios import BiographyStream, BiosVocab, Population, Uniform, no_knowledge_baseline
    >>> pop = Population.generate(1024, seed=0)
    >>> vocab = BiosVocab.default()
    >>> stream = BiographyStream(pop, vocab, Uniform(len(pop)), batch_size=16, seq_len=128, seed=0)
    >>> stream.batch(0).tokens.shape, round(no_knowledge_baseline(pop.pools), 3)
    (torch.Size([16, 128]), 6.785)
"""


from factlens.bios.config import TrainConfig
from factlens.bios.data.batches import BatchChoices, BiographyBatch, BiographyStream, eval_batches, make_batch
from factlens.bios.data.pools import ATTRIBUTES, Pools, attribute_index, no_knowledge_baseline, pool_size
from factlens.bios.data.population import Population
from factlens.bios.data.samplers import (
    Celebrities,
    PowerLaw,
    Replay,
    Sampler,
    Sequential,
    Uniform,
    WarmUp,
    make_sampler,
)
from factlens.bios.data.templates import N_TEMPLATES, TEMPLATES
from factlens.bios.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, BiosVocab
from factlens.bios.history import TrainingHistory
from factlens.bios.metrics import (
    AttributeMetrics,
    attribute_accuracy,
    attribute_loss,
    attribute_metrics,
    hallucination_metrics,
    per_attribute_loss,
    value_correct,
    value_nll,
)
from factlens.bios.patching.config import PatchConfig
from factlens.bios.phases import plateau_end, three_phases
from factlens.bios.run import Run, load_bridge, load_hf
from factlens.bios.trainer import Trainer, train

__all__ = [
    "ATTRIBUTES",
    "BOS_ID",
    "EOS_ID",
    "N_TEMPLATES",
    "PAD_ID",
    "TEMPLATES",
    "UNK_ID",
    "AttributeMetrics",
    "BatchChoices",
    "BiographyBatch",
    "BiographyStream",
    "BiosVocab",
    "Celebrities",
    "PatchConfig",
    "Pools",
    "Population",
    "PowerLaw",
    "Replay",
    "Run",
    "Sampler",
    "Sequential",
    "TrainConfig",
    "Trainer",
    "TrainingHistory",
    "Uniform",
    "WarmUp",
    "attribute_accuracy",
    "attribute_index",
    "attribute_loss",
    "attribute_metrics",
    "eval_batches",
    "hallucination_metrics",
    "load_bridge",
    "load_hf",
    "make_batch",
    "make_sampler",
    "no_knowledge_baseline",
    "per_attribute_loss",
    "plateau_end",
    "pool_size",
    "three_phases",
    "train",
    "value_correct",
    "value_nll",
]
