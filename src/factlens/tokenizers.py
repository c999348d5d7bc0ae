"""Offline GPT-2 and OPT-style tokenizers.

factlens ships the real GPT-2 BPE (built from OpenAI's ``gpt2.tiktoken`` ranks file, MIT; see
``scripts/build_gpt2_tokenizer.py``), so tests and tiny models tokenize exactly as GPT-2 does without the
hub: ``" Paris"`` is 6342.

OPT uses the same byte-level BPE *segmentation* but fairseq/RoBERTa token **ids** and prepends ``</s>``
as BOS. The fairseq id table is not available offline, so :func:`opt_style_tokenizer` keeps GPT-2's ids and
adds OPT's conventions (``</s>`` BOS prepended by ``encode``, a ``<pad>`` token). That is right for the
random-weight OPT twins built by :func:`factlens.tiny`; :func:`factlens.load` on real OPT weights uses the
hub's own tokenizer.

TransformerLens trap (notes §1.1): TL reloads the tokenizer through ``AutoTokenizer`` from its
``name_or_path``, so a tokenizer built in memory fails with ``KeyError: 'name_or_path'``. Every tokenizer
here is therefore saved to a directory and loaded back with ``AutoTokenizer.from_pretrained``.

Example:
    >>> from factlens.tokenizers import gpt2_tokenizer
    >>> gpt2_tokenizer().encode(" Paris")
    [6342]
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

DATA_DIR = Path(__file__).parent / "data" / "gpt2_tokenizer"
EOT = "<|endoftext|>"


def cache_root() -> Path:
    """factlens's cache of generated tokenizer directories: ``$FACTLENS_CACHE`` or ``<tmp>/factlens-cache``."""
    root = Path(os.environ.get("FACTLENS_CACHE", Path(tempfile.gettempdir()) / "factlens-cache"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def cached_tokenizer_dir(name: str, write: Callable[[Path], None]) -> Path:
    """The cached HF tokenizer directory ``name``, written once by ``write(tmp_dir)`` and renamed into place
    atomically (a concurrent writer's identical copy wins the race harmlessly)."""
    target = cache_root() / name
    if (target / "tokenizer_config.json").exists():
        return target
    tmp = Path(tempfile.mkdtemp(dir=cache_root(), prefix=f".{name}-"))
    write(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_dir(name: str, config: dict, added: list[dict] | None = None) -> Path:
    """Materialise an HF tokenizer directory (tokenizer.json + config) in the cache, atomically."""

    def write(tmp: Path) -> None:
        spec = json.loads((DATA_DIR / "tokenizer.json").read_text())
        for tok in added or []:
            spec["added_tokens"].append(tok)
            spec["model"]["vocab"][tok["content"]] = tok["id"]
        (tmp / "tokenizer.json").write_text(json.dumps(spec))
        (tmp / "tokenizer_config.json").write_text(json.dumps(config))

    return cached_tokenizer_dir(name, write)


def _special(content: str, idx: int) -> dict:
    return {"id": idx, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


@functools.cache
def gpt2_tokenizer_dir() -> Path:
    """Directory holding the offline GPT-2 tokenizer in HF format (for ``AutoTokenizer``)."""
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
              "model_max_length": 1024, "add_prefix_space": False, "add_bos_token": False}
    return _write_dir("gpt2-v1", config)


@functools.cache
def opt_style_tokenizer_dir() -> Path:
    """Directory holding the offline OPT-style tokenizer (GPT-2 ids, ``</s>`` BOS, ``<pad>``)."""
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "</s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": 2048,
              "add_prefix_space": False, "add_bos_token": True}
    added = [_special("</s>", 50257), _special("<pad>", 50258), _special("<unk>", 50259)]
    return _write_dir("opt-style-v1", config, added)


def _load(path: Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """The real GPT-2 BPE tokenizer, offline. No BOS is added; pad = ``<|endoftext|>``; right padding.

    Example:
        >>> from factlens.tokenizers import gpt2_tokenizer
        >>> gpt2_tokenizer()("The capital of France is")["input_ids"]
        [464, 3139, 286, 4881, 318]
    """
    return _load(gpt2_tokenizer_dir())


def opt_style_tokenizer() -> PreTrainedTokenizerBase:
    """GPT-2 BPE with OPT's conventions: ``</s>`` (id 50257) prepended as BOS, ``<pad>`` = 50258.

    Example:
        >>> from factlens.tokenizers import opt_style_tokenizer
        >>> opt_style_tokenizer()(" Paris")["input_ids"]
        [50257, 6342]
    """
    tok = _load(opt_style_tokenizer_dir())
    tok.add_bos_token = True
    return tok
