"""Biography batches: one padded biography per sequence, with value and name masks.

A biography (Zucchet et al. 2025 §1) is built per sequence: for each of the 6 attributes pick one template
uniformly from the person's train (or held-out) templates, fill in the full name and the value, randomly
permute the 6 sentences and join them. A sequence is ``<bos>`` + biography + ``<eos>``, right-padded with
``<pad>`` to ``seq_len``.

Construction is vectorised: each sentence is 10 precomputed id *pieces* (prefix, first, middle and last
name, middle fragment, 4 value pieces, suffix; see :mod:`factlens.bios.data.vocab`), and the batch is their
concatenation with ``np.repeat``. No string is tokenized. A 128 × 128 batch over 64k people takes well
under a millisecond of numpy work (``tests/test_bios_data.py`` prints the time).

:class:`BiographyStream` makes batch ``step`` a pure function of ``(seed, step)`` so a resumed run sees the
same data as an uninterrupted one, and shards a global batch over data-parallel ranks.

Example:
    >>> import numpy as np
    >>> from factlens.bios import BiosVocab, Population, make_batch
    >>> pop = Population.generate(100, seed=0)
    >>> batch = make_batch(pop, BiosVocab.default(), np.arange(4), rng=np.random.default_rng(0), seq_len=128)
    >>> batch.tokens.shape, int(batch.tokens[0, 0]), int((batch.value_attr >= 0).any(1).sum())
    (torch.Size([4, 128]), 1, 4)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from jaxtyping import Bool, Int

from factlens.bios.data.pools import N_ATTR
from factlens.bios.data.population import Population
from factlens.bios.data.vocab import BOS_PIECE, EOS_PIECE, PAD_ID, VALUE_SLOTS, BiosVocab
from factlens.errors import ConfigError

PIECES_PER_SENTENCE = 5 + VALUE_SLOTS + 1  # prefix, first, middle, last, mid, 4 value pieces, suffix
NAME_SLOTS = (1, 2, 3)
VALUE_SLOT0 = 5


@dataclass
class BiographyBatch:
    """A batch of padded biographies with the masks the metrics and analyses need.

    Attributes:
        tokens: ``[batch, pos]`` ids: ``<bos>``, biography, ``<eos>``, then ``<pad>``.
        attention_mask: ``[batch, pos]`` True on real tokens (not padding).
        value_attr: ``[batch, pos]`` attribute index 0..5 on tokens of an attribute value, -1 elsewhere.
        name_mask: ``[batch, pos]`` True on every token of the person's full name (all 6 occurrences).
        people: ``[batch]`` person index of each sequence.
        templates: ``[batch, 6]`` template index (0..24) used for each attribute.
        value_start: ``[batch, 6]`` position of each attribute value's first token.
        value_len: ``[batch, 6]`` number of tokens of each attribute value.
    """

    tokens: Int[torch.Tensor, "batch pos"]
    attention_mask: Bool[torch.Tensor, "batch pos"]
    value_attr: Int[torch.Tensor, "batch pos"]
    name_mask: Bool[torch.Tensor, "batch pos"]
    people: Int[torch.Tensor, " batch"]
    templates: Int[torch.Tensor, "batch 6"]
    value_start: Int[torch.Tensor, "batch 6"]
    value_len: Int[torch.Tensor, "batch 6"]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def loss_mask(self) -> Bool[torch.Tensor, "batch pos"]:
        """True on tokens to predict: every real token except the leading ``<bos>`` (``<eos>`` included).

        The logit at position ``p - 1`` predicts the token at ``p``; use ``loss_mask[:, 1:]`` against
        ``logits[:, :-1]``.
        """
        mask = self.attention_mask.clone()
        mask[:, 0] = False
        return mask

    @property
    def value_mask(self) -> Bool[torch.Tensor, "batch pos"]:
        """True on tokens of any attribute value."""
        return self.value_attr >= 0

    def to(self, device: torch.device | str) -> BiographyBatch:
        """A copy with every tensor on ``device``."""
        return BiographyBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def trimmed(self, multiple: int = 8) -> BiographyBatch:
        """The batch cut after its longest sequence (rounded up to ``multiple``; views, never longer).

        Padding is trailing and attention is causal, so no real token attends to the cut positions: a model's
        logits on every real token, and so every loss and metric, are unchanged, at a fraction of the compute
        (a biography batch's longest row is typically 20-30% shorter than the longest possible biography).

        Example:
            >>> import numpy as np
            >>> from factlens.bios import BiosVocab, Population, make_batch
            >>> pop, vocab = Population.generate(8, seed=0), BiosVocab.default()
            >>> batch = make_batch(pop, vocab, np.arange(8), seq_len=256)
            >>> short = batch.trimmed()
            >>> short.tokens.shape[1] % 8, short.tokens.shape[1] < 256, bool(short.attention_mask.sum() == batch.attention_mask.sum())
            (0, True, True)
        """
        longest = int(self.attention_mask.sum(1).max()) if len(self) else 0
        keep = min(self.tokens.shape[1], max(multiple, -(-longest // multiple) * multiple))
        if keep == self.tokens.shape[1]:
            return self
        cut = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("tokens", "attention_mask", "value_attr", "name_mask"):
            cut[name] = cut[name][:, :keep]
        return BiographyBatch(**cut)

    def slice(self, start: int, stop: int) -> BiographyBatch:
        """Sequences ``start:stop`` as a new batch (views)."""
        return BiographyBatch(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})

    @staticmethod
    def cat(batches: list[BiographyBatch]) -> BiographyBatch:
        """Concatenate batches along the batch axis (same ``seq_len``)."""
        return BiographyBatch(
            **{f.name: torch.cat([getattr(b, f.name) for b in batches]) for f in fields(BiographyBatch)}
        )


@dataclass(frozen=True)
class BatchChoices:
    """The random choices of a batch: people, template per attribute, sentence order."""

    people: np.ndarray  # [b]
    templates: np.ndarray  # [b, 6]
    order: np.ndarray  # [b, 6] attribute of the s-th sentence

    def rows(self, start: int, stop: int) -> BatchChoices:
        return BatchChoices(self.people[start:stop], self.templates[start:stop], self.order[start:stop])


def _split_templates(population: Population, split: str) -> np.ndarray:
    if split == "train":
        return population.train_templates
    if split == "eval":
        return population.eval_templates
    raise ConfigError(f"split={split!r}; pass 'train' or 'eval'")


def draw_choices(
    population: Population, people: np.ndarray, split: str, rng: np.random.Generator, permute: bool = True
) -> BatchChoices:
    """Draw template choices and sentence orders for ``people`` (the only randomness of a batch)."""
    people = np.asarray(people, dtype=np.int64)
    if people.ndim != 1 or len(people) == 0:
        raise ConfigError(f"people must be a non-empty 1-d index array, got shape {people.shape}")
    if people.min() < 0 or people.max() >= len(population):
        raise ConfigError(
            f"person indices must lie in [0, {len(population)}); got {people.min()}..{people.max()}"
        )
    pool = _split_templates(population, split)  # [n, 6, k]
    pick = rng.integers(0, pool.shape[-1], (len(people), N_ATTR))
    templates = pool[people[:, None], np.arange(N_ATTR)[None, :], pick].astype(np.int64)
    order = np.broadcast_to(np.arange(N_ATTR), (len(people), N_ATTR))
    order = rng.permuted(order, axis=1) if permute else order.copy()
    return BatchChoices(people, templates, order)


def assemble(population: Population, vocab: BiosVocab, choices: BatchChoices, seq_len: int) -> BiographyBatch:
    """Build the batch tensors from drawn choices by concatenating precomputed pieces (no randomness)."""
    vocab.check_pools(population.pools)
    people, b = choices.people, len(choices.people)
    rows = np.arange(b)[:, None]
    # Sentence pieces in attribute order: [b, 6, 10].
    sent = np.empty((b, N_ATTR, PIECES_PER_SENTENCE), dtype=np.int64)
    tpl = vocab.template_pieces[np.arange(N_ATTR)[None, :], choices.templates]  # [b, 6, 3]
    names = population.names[people]  # [b, 3]
    sent[:, :, 0] = tpl[..., 0]
    sent[:, :, 1] = vocab.first_name_pieces[names[:, 0]][:, None]
    sent[:, :, 2] = vocab.first_name_pieces[names[:, 1]][:, None]
    sent[:, :, 3] = vocab.last_name_pieces[names[:, 2]][:, None]
    sent[:, :, 4] = tpl[..., 1]
    vals = population.values[people]  # [b, 6]
    for a in range(N_ATTR):
        sent[:, a, VALUE_SLOT0 : VALUE_SLOT0 + VALUE_SLOTS] = vocab.value_slots(a, vals[:, a])
    sent[:, :, -1] = tpl[..., 2]
    sent = sent[rows, choices.order]  # permute sentences: [b, 6, 10]

    # Per-piece labels: attribute index on value pieces, -1 elsewhere; name flag on name pieces.
    slot = np.arange(PIECES_PER_SENTENCE)
    is_value = (slot >= VALUE_SLOT0) & (slot < VALUE_SLOT0 + VALUE_SLOTS)
    attr_lab = np.where(is_value[None, None, :], choices.order[:, :, None], -1)  # [b, 6, 10]
    name_lab = np.broadcast_to(np.isin(slot, NAME_SLOTS), sent.shape)

    n_pieces = N_ATTR * PIECES_PER_SENTENCE + 2
    piece = np.empty((b, n_pieces), dtype=np.int64)
    piece[:, 0], piece[:, -1] = BOS_PIECE, EOS_PIECE
    piece[:, 1:-1] = sent.reshape(b, -1)
    attr = np.full((b, n_pieces), -1, dtype=np.int64)
    attr[:, 1:-1] = attr_lab.reshape(b, -1)
    is_name = np.zeros((b, n_pieces), dtype=bool)
    is_name[:, 1:-1] = name_lab.reshape(b, -1)

    length = vocab.piece_len[piece]  # [b, P]
    total = length.sum(1)
    if total.max() > seq_len:
        worst = int(total.argmax())
        raise ConfigError(
            f"the biography of person {int(people[worst])} needs {int(total[worst])} tokens but "
            f"seq_len={seq_len}; pass seq_len >= {vocab.max_biography_tokens()} "
            f"(vocab.max_biography_tokens())"
        )
    start_in_seq = np.cumsum(length, 1) - length  # [b, P] position of each piece's first token
    flat_len = length.ravel()
    n_tok = int(flat_len.sum())
    tok_piece = np.repeat(piece.ravel(), flat_len)  # [T]
    first_tok = np.repeat(np.cumsum(flat_len) - flat_len, flat_len)  # [T] global index of piece start
    offset = np.arange(n_tok) - first_tok  # [T] position within its piece
    tok_row = np.repeat(np.repeat(np.arange(b), n_pieces), flat_len)
    tok_pos = np.repeat(start_in_seq.ravel(), flat_len) + offset
    tok_id = vocab.pieces[vocab.piece_start[tok_piece] + offset]

    tokens = np.full((b, seq_len), PAD_ID, dtype=np.int64)
    tokens[tok_row, tok_pos] = tok_id
    value_attr = np.full((b, seq_len), -1, dtype=np.int64)
    value_attr[tok_row, tok_pos] = np.repeat(attr.ravel(), flat_len)
    name_mask = np.zeros((b, seq_len), dtype=bool)
    name_mask[tok_row, tok_pos] = np.repeat(is_name.ravel(), flat_len)
    attention = np.arange(seq_len)[None, :] < total[:, None]

    # Value start / length per attribute (undo the sentence permutation).
    sent_start = start_in_seq[:, 1:-1].reshape(b, N_ATTR, PIECES_PER_SENTENCE)[:, :, VALUE_SLOT0]
    sent_vlen = length[:, 1:-1].reshape(b, N_ATTR, PIECES_PER_SENTENCE)[:, :, is_value].sum(-1)
    value_start = np.empty((b, N_ATTR), dtype=np.int64)
    value_len = np.empty((b, N_ATTR), dtype=np.int64)
    value_start[rows, choices.order] = sent_start
    value_len[rows, choices.order] = sent_vlen

    t = torch.from_numpy
    return BiographyBatch(
        tokens=t(tokens),
        attention_mask=t(attention),
        value_attr=t(value_attr),
        name_mask=t(name_mask),
        people=t(people.copy()),
        templates=t(choices.templates),
        value_start=t(value_start),
        value_len=t(value_len),
    )


def make_batch(
    population: Population,
    vocab: BiosVocab,
    people: np.ndarray,
    split: str = "train",
    rng: np.random.Generator | None = None,
    seq_len: int = 128,
    permute: bool = True,
) -> BiographyBatch:
    """One biography per person in ``people``.

    Args:
        population: The people.
        vocab: The task vocabulary built over ``population.pools``.
        people: ``[b]`` person indices (repeats allowed).
        split: ``"train"`` (each person's training templates) or ``"eval"`` (held-out templates).
        rng: Generator for template choices and sentence order (default: seeded with 0).
        seq_len: Padded length; must fit the longest biography.
        permute: Shuffle the 6 sentences (the paper's default; ``False`` keeps attribute order, Fig. A).

    Raises:
        ConfigError: A biography does not fit ``seq_len``, bad indices or split, or mismatched pools.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    return assemble(population, vocab, draw_choices(population, people, split, rng, permute), seq_len)


class BiographyStream:
    """An infinite, resumable, shardable stream of training batches.

    ``batch(step)`` draws the global batch from ``np.random.default_rng([seed, step])``: the people with
    ``sampler(step, batch_size, rng)``, then the template choices and sentence orders of all
    ``batch_size`` sequences. Rank ``r`` of ``w`` builds rows ``r*b/w : (r+1)*b/w`` of that global batch,
    so the ranks' shards concatenate to the single-process batch.

    Example:
        >>> from factlens.bios import BiosVocab, Population, Uniform
        >>> from factlens.bios import BiographyStream
        >>> pop = Population.generate(64, seed=0)
        >>> stream = BiographyStream(pop, BiosVocab.default(), Uniform(64), batch_size=8, seq_len=128, seed=1)
        >>> bool((stream.batch(5).tokens == stream.batch(5).tokens).all())
        True
        >>> len(stream.batch(5, rank=1, world_size=2))
        4
    """

    def __init__(
        self,
        population: Population,
        vocab: BiosVocab,
        sampler,
        batch_size: int,
        seq_len: int = 128,
        seed: int = 0,
        split: str = "train",
        permute: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}; pass a positive batch size")
        if getattr(sampler, "n", len(population)) != len(population):
            raise ConfigError(
                f"the sampler draws from {sampler.n} people but the population has "
                f"{len(population)}; build the sampler with n={len(population)}"
            )
        _split_templates(population, split)
        vocab.check_pools(population.pools)
        if seq_len < vocab.max_biography_tokens():
            raise ConfigError(
                f"seq_len={seq_len} is shorter than the longest possible biography; pass "
                f"seq_len >= {vocab.max_biography_tokens()}"
            )
        self.population, self.vocab, self.sampler = population, vocab, sampler
        self.batch_size, self.seq_len, self.seed = int(batch_size), int(seq_len), int(seed)
        self.split, self.permute = split, permute

    def choices(self, step: int) -> BatchChoices:
        """All random choices of global batch ``step``."""
        if step < 0:
            raise ConfigError(f"step={step}; pass a non-negative step")
        rng = np.random.default_rng([self.seed, int(step)])
        people = np.asarray(self.sampler(int(step), self.batch_size, rng), dtype=np.int64)
        return draw_choices(self.population, people, self.split, rng, self.permute)

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> BiographyBatch:
        """Batch ``step`` (rank ``rank``'s shard when ``world_size > 1``)."""
        if world_size < 1 or not 0 <= rank < world_size or self.batch_size % world_size:
            raise ConfigError(
                f"rank={rank}, world_size={world_size}, batch_size={self.batch_size}: need "
                f"0 <= rank < world_size and batch_size divisible by world_size"
            )
        per = self.batch_size // world_size
        choices = self.choices(step).rows(rank * per, (rank + 1) * per)
        return assemble(self.population, self.vocab, choices, self.seq_len)

    def __repr__(self) -> str:
        return (
            f"BiographyStream(n={len(self.population)}, sampler={self.sampler!r}, "
            f"batch_size={self.batch_size}, seq_len={self.seq_len}, seed={self.seed}, split={self.split!r})"
        )


def eval_batches(
    population: Population,
    vocab: BiosVocab,
    n_sequences: int,
    batch_size: int,
    seq_len: int = 128,
    seed: int = 0,
    split: str = "eval",
) -> list[BiographyBatch]:
    """A fixed evaluation set: ``n_sequences`` people uniform over the population, held-out templates.

    People are drawn without replacement when ``n_sequences <= len(population)`` (with replacement
    otherwise); the set depends only on the arguments.

    Example:
        >>> from factlens.bios import BiosVocab, Population
        >>> from factlens.bios import eval_batches
        >>> pop = Population.generate(50, seed=0)
        >>> [len(b) for b in eval_batches(pop, BiosVocab.default(), n_sequences=20, batch_size=8)]
        [8, 8, 4]
    """
    if n_sequences < 1 or batch_size < 1:
        raise ConfigError(f"n_sequences={n_sequences}, batch_size={batch_size}; pass positive values")
    rng = np.random.default_rng([seed, 0xE7A1])
    people = rng.choice(len(population), size=n_sequences, replace=n_sequences > len(population))
    choices = draw_choices(population, people, split, rng)
    return [
        assemble(population, vocab, choices.rows(i, i + batch_size), seq_len)
        for i in range(0, n_sequences, batch_size)
    ]


__all__ = [
    "BatchChoices",
    "BiographyBatch",
    "BiographyStream",
    "assemble",
    "draw_choices",
    "eval_batches",
    "make_batch",
]
