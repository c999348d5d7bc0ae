"""The biography task of one training run: who the people are, how they are tokenised, what the model sees.

:class:`BiosTask` builds, from a :class:`~factlens.bios.config.TrainConfig` alone, everything the trainer
needs besides the model: the population, its vocabulary, the sequence length, the training stream (a pure
function of ``(data_seed, step)``) and the fixed evaluation sets: held-out templates per group of people
(one group, ``""``, for pre-training; ``old_`` and ``new_`` people for fine-tuning) and unseen people for
the hallucination metrics.

Example:
    >>> from factlens.bios.config import TrainConfig
    >>> from factlens.bios.task import BiosTask
    >>> task = BiosTask.build(TrainConfig.preset("tiny", n_eval_sequences=8, n_unseen=4))
    >>> len(task.population), task.stream.batch(0).tokens.shape[0], list(task.eval_sets)
    (64, 8, ['', 'unseen_'])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from factlens.bios.config import TrainConfig
from factlens.bios.data.batches import BiographyBatch, BiographyStream, eval_batches
from factlens.bios.data.population import Population
from factlens.bios.data.samplers import Replay, make_sampler
from factlens.bios.data.vocab import BiosVocab
from factlens.bios.metrics import AttributeMetrics, attribute_metrics
from factlens.errors import ConfigError

UNSEEN = "unseen_"  # the prefix of the hallucination metrics, computed on people the model never saw


@dataclass
class BiosTask:
    """The data side of a run. Build it with :meth:`build`.

    Attributes:
        population: the people trained on (old and new people for a fine-tuning run).
        vocab: the task vocabulary (one token per name part and attribute value).
        seq_len: the padded length of every sequence.
        stream: the training batches, ``stream.batch(step, rank, world)``.
        eval_sets: metric prefix → fixed evaluation batches (held-out templates; ``"unseen_"``: people never
            trained on, for ``top_prob`` and ``entropy``).
    """

    population: Population
    vocab: BiosVocab
    seq_len: int
    stream: BiographyStream
    eval_sets: dict[str, list[BiographyBatch]] = field(repr=False)

    @classmethod
    def build(cls, config: TrainConfig, population: Population | None = None) -> BiosTask:
        """The task of ``config`` (``population``: a pre-generated one of ``config.n_people`` people; for a
        fine-tuning run, the pre-training run's people, checked against the fingerprint its config records)."""
        population = population or config.make_population()
        if population.n_train_templates != config.n_train_templates:
            raise ConfigError(f"the population has {population.n_train_templates} training templates per person, the "
                              f"config says n_train_templates={config.n_train_templates}; generate the people with "
                              "config.make_population() or set n_train_templates to theirs.")
        if len(population) != config.n_people:
            raise ConfigError(f"the population has {len(population)} people, the config says {config.n_people}; "
                              "pass a population of n_people people or set n_people to its size.")
        vocab = BiosVocab(population.pools)
        seq_len = config.validate(vocab.max_biography_tokens())
        if config.finetune:
            population, sampler, groups = _finetune_setup(config, population)
        else:
            sampler = make_sampler(config.sampler, n=config.n_people, batch_size=config.batch_size)
            groups = {"": (0, len(population))}
        # Evaluation keeps the paper's shuffled order even when training does not: it measures knowledge of the
        # person, which a fixed order can replace by position (Fig. A).
        stream = BiographyStream(population, vocab, sampler, config.batch_size, seq_len, seed=config.data_seed,
                                 permute=config.permute_sentences)
        eval_sets = {prefix: eval_batches(people_slice(population, lo, hi), vocab, config.n_eval_sequences,
                                          config.eval_batch_size, seq_len, seed=config.data_seed)
                     for prefix, (lo, hi) in groups.items()}
        if config.n_unseen:
            unseen = population.unseen(config.n_unseen, seed=config.data_seed + 1)
            eval_sets[UNSEEN] = eval_batches(unseen, vocab, config.n_unseen, config.eval_batch_size, seq_len,
                                             seed=config.data_seed + 1, split="train")
        return cls(population=population, vocab=vocab, seq_len=seq_len, stream=stream, eval_sets=eval_sets)

    @torch.no_grad()
    def evaluate(self, logits: Callable[[torch.Tensor], torch.Tensor],
                 on_device: Callable[[BiographyBatch], BiographyBatch]) -> dict[str, float]:
        """``attr_loss``, ``attr_acc``, ``top_prob`` and ``entropy`` on every evaluation set, under its prefix.

        Sets: held-out templates of the trained people (no prefix; ``old_``/``new_`` people when fine-tuning)
        and people never trained on (``unseen_``). Loss and accuracy are means over values, top-token
        probability and entropy means over value tokens, each pooled over the set's batches by its own count
        (:meth:`~factlens.bios.metrics.AttributeMetrics.combine`).

        Args:
            logits: ``tokens [batch, pos] -> logits [batch, pos, vocab]`` (the model's forward, patched or not).
            on_device: moves (and trims) an evaluation batch to the model's device.
        """
        out: dict[str, float] = {}
        for prefix, batches in self.eval_sets.items():
            parts = []
            for batch in batches:
                batch = on_device(batch)
                parts.append(attribute_metrics(logits(batch.tokens).float(), batch))
            if parts:
                out.update({prefix + k: v for k, v in AttributeMetrics.combine(parts).summary().items()})
        return out


def trained_population(config: TrainConfig, population: Population) -> Population:
    """The people a run of ``config`` trains on, from its base ``population`` (old and new for fine-tuning)."""
    return _finetune_setup(config, population)[0] if config.finetune else population


def _finetune_setup(config: TrainConfig, population: Population):
    """(population, sampler, eval groups) for a fine-tuning run; eval groups map a prefix to people indices.

    The old people must be the pre-training run's (their fingerprint is in the config): other people would be
    measured as "old" although the model never saw them."""
    ft = config.finetune
    if ft.population_sha256 is not None and population.fingerprint() != ft.population_sha256:
        raise ConfigError(
            f"the old people of this fine-tuning run (fingerprint {population.fingerprint()}, from n_people="
            f"{config.n_people}, data_seed={config.data_seed}) are not the pre-training run's "
            f"({ft.population_sha256}): they would be measured as old although the model never saw them. Keep the "
            "pre-training run's n_people, data_seed and pools (do not override them in finetune_config), or pass "
            "population=Run(pretraining_run).population().")
    if ft.seen_from is not None:  # already-seen people seen_from..N-1 (e.g. the non-celebrities)
        if ft.seen_from >= len(population):
            raise ConfigError(f"seen_from={ft.seen_from}; fine-tuning on already-seen people needs 0 < seen_from < "
                              f"{len(population)} (the pre-training population).")
        both, n_old = population, ft.seen_from
    else:
        both = Population.concatenate([population, population.unseen(ft.n_new, seed=ft.new_seed)])
        n_old = len(population)
    target = people_slice(both, n_old, len(both))
    if ft.new_population_sha256 is not None and target.fingerprint() != ft.new_population_sha256:
        raise ConfigError(f"the fine-tuning people rebuilt from this run's config (fingerprint {target.fingerprint()}) "
                          f"are not the ones it recorded ({ft.new_population_sha256}): the code that generates people "
                          "changed, or the config was edited. Use the factlens version that trained the run, or "
                          "fine-tune again.")
    sampler = Replay(n_old, len(both) - n_old, ft.old_weight)
    return both, sampler, {"old_": (0, n_old), "new_": (n_old, len(both))}


def people_slice(population: Population, lo: int, hi: int) -> Population:
    """People ``lo..hi-1`` of a population, as a population (for evaluating old and new people apart)."""
    return dataclasses.replace(population, names=population.names[lo:hi], values=population.values[lo:hi],
                               train_templates=population.train_templates[lo:hi],
                               eval_templates=population.eval_templates[lo:hi])


__all__ = ["UNSEEN", "BiosTask", "people_slice", "trained_population"]
