"""Word-level task tokenizer of the synthetic biographies, with precomputed id pieces for fast batching.

The vocabulary is every word of the templates and of the value/name pools, plus four special tokens:
``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3. Text is pre-tokenized by splitting on
whitespace and isolating every punctuation character, so ``"Smith's"`` -> ``Smith ' s`` and
``"March 16, 2042."`` -> ``March 16 , 2042 .``. A value's tokens therefore never merge with the text
around it (Zucchet et al. 2025 splice values in after tokenization for the same reason).

Batches are built without tokenizing strings: every template fragment, name and value is tokenized once
into a *piece* (a short id array), and a biography is the concatenation of pieces
(see :mod:`factlens.bios.data.batches`).

TransformerLens trap: TL reloads a tokenizer with ``AutoTokenizer.from_pretrained(name_or_path)``, so an
in-memory tokenizer fails. :meth:`BiosVocab.save_pretrained` writes an HF tokenizer directory and
:meth:`BiosVocab.hf_tokenizer` loads one back from a cache directory.

Example:
    >>> from factlens.bios.data.vocab import BiosVocab
    >>> vocab = BiosVocab.default()
    >>> vocab.size > 3000, vocab.bos_id, vocab.pad_id
    (True, 1, 0)
    >>> vocab.decode(vocab.encode("Mary Ann Smith was born on March 16, 2042."))
    'Mary Ann Smith was born on March 16 , 2042 .'
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
from jaxtyping import Int
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from factlens.bios.data.pools import ATTRIBUTES, MONTHS, Pools
from factlens.bios.data.templates import N_TEMPLATES, check_templates, template_parts
from factlens.errors import ConfigError, TokenizationError
from factlens.tokenizers import cached_tokenizer_dir

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
EMPTY_PIECE, BOS_PIECE, EOS_PIECE, COMMA_PIECE = 0, 1, 2, 3
VALUE_SLOTS = 4
"""Pieces per attribute value: a date is month, day, ``,``, year; other values use one piece + 3 empty."""


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )


class BiosVocab:
    """The task tokenizer over one set of pools, plus id pieces for every template fragment and value.

    Args:
        pools: The value pools (default: :meth:`Pools.default`). A population must use the same pools.

    Attributes:
        pools: The pools.
        tokenizer: The ``tokenizers.Tokenizer`` (WordLevel model).
        pieces, piece_start, piece_len: All pieces concatenated, and where each starts and how long it is.
        template_pieces: ``[6, 25, 3]`` piece of each template's prefix, middle and suffix.
        first_name_pieces, last_name_pieces: Piece of each first/last name.
        value_pieces: ``[6, max_pool, 4]`` pieces of each non-date value (row 0, dates, is unused).
        month_pieces, day_pieces, year_pieces: Pieces of date parts.

    Example:
        >>> from factlens.bios import BiosVocab, Pools
        >>> vocab = BiosVocab(Pools.sized(first_names=5, last_names=5, cities=5, universities=30,
        ...                               majors=5, companies=5, years=2))
        >>> vocab.tokens(vocab.token_ids("University of California, Berkeley"))
        ['University', 'of', 'California', ',', 'Berkeley']
    """

    def __init__(self, pools: Pools | None = None) -> None:
        check_templates()
        self.pools = pools or Pools.default()
        self._pre = _pre_tokenizer()
        parts = [[template_parts(a, t) for t in range(N_TEMPLATES)] for a in range(len(ATTRIBUTES))]
        strings: list[str] = [",", "."]
        strings += [s for group in parts for triple in group for s in triple]
        strings += list(MONTHS) + [str(d) for d in range(1, self.pools.days + 1)] + [str(y) for y in self.pools.years]
        for field in ("first_names", "last_names", "cities", "universities", "majors", "companies"):
            strings += getattr(self.pools, field)
        words: dict[str, None] = {}
        for s in strings:
            words.update((w, None) for w, _ in self._pre.pre_tokenize_str(s))
        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        for w in words:
            vocab.setdefault(w, len(vocab))
        self._vocab = vocab
        self._fingerprint: str | None = None
        self._id_to_token = list(vocab)
        self.tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        self.tokenizer.pre_tokenizer = _pre_tokenizer()
        self.tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
        )
        self._build_pieces(parts)

    @classmethod
    def default(cls) -> BiosVocab:
        """The vocabulary of the default (paper-sized) pools (cached)."""
        return _default_vocab()

    # --- tokenization --------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Vocabulary size including the 4 special tokens (use it as the model's ``d_vocab``)."""
        return len(self._vocab)

    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    def id(self, token: str) -> int:
        """Id of one vocabulary word."""
        if token not in self._vocab:
            raise TokenizationError(f"{token!r} is not in the task vocabulary; use a pool or template word")
        return self._vocab[token]

    def token_ids(self, text: str) -> list[int]:
        """Ids of a string, raising :class:`TokenizationError` on any word outside the vocabulary."""
        words = [w for w, _ in self._pre.pre_tokenize_str(text)]
        missing = [w for w in words if w not in self._vocab]
        if missing:
            raise TokenizationError(
                f"words {missing[:5]} are not in the task vocabulary; the text must use "
                f"only template and pool words"
            )
        return [self._vocab[w] for w in words]

    def encode(self, text: str) -> list[int]:
        """Ids of a string with the HF tokenizer (unknown words -> ``<unk>``; no BOS/EOS added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int] | np.ndarray, skip_special: bool = False) -> str:
        """Space-joined words of ``ids`` (``<pad>`` always dropped)."""
        toks = [self._id_to_token[int(i)] for i in ids if int(i) != PAD_ID]
        if skip_special:
            toks = [t for t in toks if t not in SPECIAL_TOKENS]
        return " ".join(toks)

    def tokens(self, ids: list[int] | np.ndarray) -> list[str]:
        """The word of each id."""
        return [self._id_to_token[int(i)] for i in ids]

    # --- pieces --------------------------------------------------------------------------------------
    def _build_pieces(self, parts: list[list[tuple[str, str, str]]]) -> None:
        chunks: list[list[int]] = [[], [BOS_ID], [EOS_ID], [self._vocab[","]]]
        index: dict[tuple[int, ...], int] = {(): 0}

        def piece(text: str) -> int:
            ids = tuple(self.token_ids(text))
            if ids not in index:
                index[ids] = len(chunks)
                chunks.append(list(ids))
            return index[ids]

        p = self.pools
        self.template_pieces = np.array(
            [[[piece(s) for s in triple] for triple in group] for group in parts], dtype=np.int64
        )
        self.first_name_pieces = np.array([piece(x) for x in p.first_names], dtype=np.int64)
        self.last_name_pieces = np.array([piece(x) for x in p.last_names], dtype=np.int64)
        self.month_pieces = np.array([piece(m) for m in MONTHS], dtype=np.int64)
        self.day_pieces = np.array([piece(str(d)) for d in range(1, p.days + 1)], dtype=np.int64)
        self.year_pieces = np.array([piece(str(y)) for y in p.years], dtype=np.int64)
        width = max(p.pool_size(a) for a in range(1, len(ATTRIBUTES)))
        self.value_pieces = np.zeros((len(ATTRIBUTES), width, VALUE_SLOTS), dtype=np.int64)
        for a in range(1, len(ATTRIBUTES)):
            vals = p.values(a)
            self.value_pieces[a, : len(vals), 0] = [piece(v) for v in vals]
        self.piece_len = np.array([len(c) for c in chunks], dtype=np.int64)
        self.piece_start = np.concatenate([[0], np.cumsum(self.piece_len)[:-1]]).astype(np.int64)
        self.pieces = np.array([i for c in chunks for i in c], dtype=np.int64)

    def value_slots(self, attr: int, values: Int[np.ndarray, " k"]) -> Int[np.ndarray, "k 4"]:
        """The 4 value pieces of each value index of an attribute (vectorised)."""
        values = np.asarray(values, dtype=np.int64)
        if attr == 0:
            day, month, year = self.pools.date_parts(values)
            comma = np.full_like(values, COMMA_PIECE)
            return np.stack(
                [self.month_pieces[month], self.day_pieces[day], comma, self.year_pieces[year]], -1
            )
        return self.value_pieces[attr, values]

    def piece_ids(self, piece: int) -> list[int]:
        """Token ids of one piece."""
        s = int(self.piece_start[piece])
        return self.pieces[s : s + int(self.piece_len[piece])].tolist()

    def max_biography_tokens(self) -> int:
        """Longest possible biography in tokens, ``<bos>`` and ``<eos>`` included (pick ``seq_len`` >= it)."""
        L = self.piece_len
        name = 2 * L[self.first_name_pieces].max() + L[self.last_name_pieces].max()
        total = 2 + len(ATTRIBUTES) * name + L[self.template_pieces].sum(-1).max(-1).sum()
        total += 4  # a date is always month, day, ',', year
        for a in range(1, len(ATTRIBUTES)):
            total += L[self.value_pieces[a, : self.pools.pool_size(a), 0]].max()
        return int(total)

    # --- HF / TransformerLens ------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Short sha256 of the vocabulary (word -> id); equal vocabularies give equal ids."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha256(json.dumps(self._vocab).encode()).hexdigest()[:16]
        return self._fingerprint

    def save_pretrained(self, directory: str | os.PathLike, model_max_length: int = 2048) -> Path:
        """Write an HF tokenizer directory that ``AutoTokenizer.from_pretrained`` (and so TL) can load.

        Example:
            >>> import tempfile
            >>> from transformers import AutoTokenizer
            >>> from factlens.bios import BiosVocab
            >>> vocab = BiosVocab.default()
            >>> d = vocab.save_pretrained(tempfile.mkdtemp())
            >>> text = "Mary was born on"
            >>> AutoTokenizer.from_pretrained(d).encode(text) == vocab.encode(text)
            True
        """
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(
            tokenizer_object=self.tokenizer.__class__.from_str(self.tokenizer.to_str()),
            bos_token="<bos>",
            eos_token="<eos>",
            pad_token="<pad>",
            unk_token="<unk>",
            model_max_length=model_max_length,
        )
        directory = Path(directory)
        hf.save_pretrained(str(directory))
        return directory

    def hf_tokenizer_dir(self) -> Path:
        """A cached HF tokenizer directory for this vocabulary (written once, atomically)."""
        return cached_tokenizer_dir(f"bios-vocab-{self.fingerprint()}", self.save_pretrained)

    def hf_tokenizer(self):
        """``AutoTokenizer.from_pretrained`` of :meth:`hf_tokenizer_dir` (what TransformerLens needs)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.hf_tokenizer_dir()))

    def check_pools(self, pools: Pools) -> None:
        """Raise :class:`ConfigError` unless ``pools`` are the pools this vocabulary was built for."""
        if pools is not self.pools and pools.fingerprint() != self.pools.fingerprint():
            raise ConfigError(
                "the population and the vocabulary use different pools; build the vocabulary "
                "with BiosVocab(population.pools)"
            )

    def __repr__(self) -> str:
        return f"BiosVocab(size={self.size}, pools={self.pools.fingerprint()})"


@functools.cache
def _default_vocab() -> BiosVocab:
    return BiosVocab(Pools.default())


__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "SPECIAL_TOKENS", "UNK_ID", "BiosVocab"]
