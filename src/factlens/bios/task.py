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

from dataclasses import dataclass, field

from factlens.bios.config import TrainConfig
from factlens.bios.data.batches import BiographyBatch, BiographyStream, eval_batches
from factlens.bios.data.population import Population
from factlens.bios.data.samplers import make_sampler
from factlens.bios.data.vocab import BiosVocab
from factlens.bios.finetune import people_slice
from factlens.bios.finetune import setup as finetune_setup
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
        """The task of ``config`` (``population``: a pre-generated one of ``config.n_people`` people)."""
        population = population or Population.generate(config.n_people, seed=config.data_seed,
                                                        pools=config.make_pools())
        if len(population) != config.n_people:
            raise ConfigError(f"the population has {len(population)} people, the config says {config.n_people}; "
                              "pass a population of n_people people or set n_people to its size.")
        vocab = BiosVocab(population.pools)
        seq_len = config.validate(vocab.max_biography_tokens())
        if config.finetune:
            population, sampler, groups = finetune_setup(config, population)
        else:
            sampler = make_sampler(config.sampler, n=config.n_people, batch_size=config.batch_size)
            groups = {"": (0, len(population))}
        stream = BiographyStream(population, vocab, sampler, config.batch_size, seq_len, seed=config.data_seed)
        eval_sets = {prefix: eval_batches(people_slice(population, lo, hi), vocab, config.n_eval_sequences,
                                          config.eval_batch_size, seq_len, seed=config.data_seed)
                     for prefix, (lo, hi) in groups.items()}
        if config.n_unseen:
            unseen = population.unseen(config.n_unseen, seed=config.data_seed + 1)
            eval_sets[UNSEEN] = eval_batches(unseen, vocab, config.n_unseen, config.eval_batch_size, seq_len,
                                             seed=config.data_seed + 1, split="train")
        return cls(population=population, vocab=vocab, seq_len=seq_len, stream=stream, eval_sets=eval_sets)


__all__ = ["UNSEEN", "BiosTask"]
