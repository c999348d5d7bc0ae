"""Synthetic biographies of Zucchet et al. (2025), "How do language models learn facts?" (data side).

- :mod:`~factlens.bios.pools`: value pools (900 first names, 1,000 last names, 800 cities, 200
  universities, 100 majors, 500 companies, 74,772 birth dates) and the no-knowledge baseline.
- :mod:`~factlens.bios.templates`: 25 templates per attribute.
- :mod:`~factlens.bios.population`: the people, their values and their 20/5 train/held-out template split.
- :mod:`~factlens.bios.vocab`: the word-level task tokenizer (HF ``tokenizers``, loadable by TransformerLens).
- :mod:`~factlens.bios.batches`: padded biography batches with value/name masks, a resumable sharded stream.
- :mod:`~factlens.bios.samplers`: uniform, power-law, celebrity, warm-up, sequential and replay samplers.
- :mod:`~factlens.bios.metrics`: attribute loss/accuracy, hallucination metrics, plateau end.

Example:
    >>> from factlens.bios import BiographyStream, BiosVocab, Population, Uniform, no_knowledge_baseline
    >>> pop = Population.generate(1024, seed=0)
    >>> vocab = BiosVocab.default()
    >>> stream = BiographyStream(pop, vocab, Uniform(len(pop)), batch_size=16, seq_len=128, seed=0)
    >>> stream.batch(0).tokens.shape, round(no_knowledge_baseline(pop.pools), 3)
    (torch.Size([16, 128]), 6.785)
"""

from factlens.bios.batches import BatchChoices, BiographyBatch, BiographyStream, eval_batches, make_batch
from factlens.bios.metrics import (
    AttributeMetrics,
    attribute_accuracy,
    attribute_loss,
    attribute_metrics,
    hallucination_metrics,
    per_attribute_loss,
    plateau_end,
    value_correct,
    value_nll,
)
from factlens.bios.pools import ATTRIBUTES, Pools, attribute_index, no_knowledge_baseline, pool_size
from factlens.bios.population import Population
from factlens.bios.samplers import (
    Celebrities,
    PowerLaw,
    Replay,
    Sampler,
    Sequential,
    Uniform,
    WarmUp,
    make_sampler,
)
from factlens.bios.templates import N_TEMPLATES, TEMPLATES
from factlens.bios.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, BiosVocab

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
    "Pools",
    "Population",
    "PowerLaw",
    "Replay",
    "Sampler",
    "Sequential",
    "Uniform",
    "WarmUp",
    "attribute_accuracy",
    "attribute_index",
    "attribute_loss",
    "attribute_metrics",
    "eval_batches",
    "hallucination_metrics",
    "make_batch",
    "make_sampler",
    "no_knowledge_baseline",
    "per_attribute_loss",
    "plateau_end",
    "pool_size",
    "value_correct",
    "value_nll",
]
