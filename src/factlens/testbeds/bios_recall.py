"""Biography relations as recall datasets: the Lv et al. analyses on a model with genuine recall.

Random-weight models recall nothing, and real GPT-2 weights need the hub. A model trained by
:mod:`factlens.bios.trainer` knows its people's facts, so the capital-task machinery (path patching, mover heads,
MLP decomposition, mitigations) can be run on real recall offline. :func:`bios_relation_dataset` turns an
attribute of a trained run's population into a :class:`~factlens.recall.relations.RelationDataset`:
``"<bos> Mary Jane Smith was born in" → first token of the birth place``. The subject is the person's full name
(a multi-token span ``N``..``N_last``), the answer the first token of the attribute value, ``end`` the
position that predicts it.

Example:
    >>> from factlens.bios.run import Run
    >>> from factlens.testbeds.bios_recall import bios_relation_dataset
    >>> run = Run("out/demo")
    >>> population, vocab = run.population(), run.vocab()                               # doctest: +SKIP
    >>> data = bios_relation_dataset(population, vocab, "birth_place", n=128)          # doctest: +SKIP
    >>> model = run.bridge()                                                            # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np

from factlens.bios.data.pools import ATTRIBUTES, attribute_index
from factlens.bios.data.population import Population
from factlens.bios.data.templates import template_parts
from factlens.bios.data.vocab import BiosVocab
from factlens.errors import ConfigError
from factlens.recall.datasets import RelationDataset, make_prompt_dataset


def bios_prompt(population: Population, person: int, attribute: int, template: int) -> tuple[str, str, str]:
    """(prompt, subject, answer) for one person, attribute and template; the prompt ends before the value."""
    prefix, middle, _ = template_parts(attribute, template)
    name = population.full_name(person)
    text = " ".join(part for part in ("<bos>", prefix.strip(), name, middle.strip()) if part)
    value = population.pools.render(ATTRIBUTES[attribute], int(population.values[person, attribute]))
    return text, name, value


def bios_relation_dataset(population: Population, vocab: BiosVocab, attribute: str | int = "birth_place", *,
                          n: int | None = 256, people: np.ndarray | None = None, split: str = "eval",
                          seed: int = 0) -> RelationDataset:
    """A recall dataset for one attribute of a biography population.

    Args:
        attribute: ``birth_date``, ``birth_place``, ``university``, ``major``, ``company`` or
            ``current_location`` (or its index).
        n: number of people, drawn uniformly without replacement (ignored when ``people`` is given).
        split: ``"eval"`` uses each person's held-out templates (sentences never seen in training for that
            person), ``"train"`` their training templates.
    """
    attr = attribute_index(attribute)
    rng = np.random.default_rng([seed, attr])
    if people is None:
        if n is None or n > len(population):
            n = len(population)
        people = rng.choice(len(population), size=n, replace=False)
    if split not in ("eval", "train"):
        raise ConfigError(f"split={split!r}; use 'eval' (held-out templates) or 'train'.")
    pool = population.eval_templates if split == "eval" else population.train_templates
    items = [bios_prompt(population, int(i), attr, int(rng.choice(pool[int(i), attr]))) for i in people]
    return make_prompt_dataset(items, vocab.hf_tokenizer(), name=f"bios:{ATTRIBUTES[attr]}", first_piece=True,
                               multi_token_subjects=True, seed=seed)
