"""Opening GPT-2 / OPT weights from wherever a user keeps them, and the compatibility-mode rule.

:func:`factlens.load` accepts three kinds of source, all resolved here:

- a **local folder** written by ``model.save_pretrained(folder)`` (plus ``tokenizer.save_pretrained(folder)``);
- an **HF cache path**: a ``models--org--name`` folder of the Hugging Face cache, or one of its
  ``snapshots/<hash>`` folders;
- an **HF id** (``"gpt2"``, ``"openai-community/gpt2-medium"``, ``"facebook/opt-1.3b"``, any id whose
  architecture is GPT-2 or OPT): read from the local HF cache when it is there, else downloaded.

The architecture comes from the folder's ``config.json`` (``model_type`` ``gpt2`` or ``opt``); anything else
raises :class:`~factlens.errors.UnknownModelError` naming the supported ones. The tokenizer is always the
folder's own: a real OPT checkpoint's ids differ from GPT-2's. Weights that are nowhere to be found (offline
with an empty cache) raise :class:`~factlens.errors.CheckpointError` naming the three ways out, instead of
transformers' traceback.

**The compatibility-mode rule.** Every Lv et al. analysis (logit lens, path patching, mover check, MLP
decomposition, final-layer effect, intercept fit, mitigation table, ``analyze``) reads intermediate activations
and weights in HookedTransformer numerics, so each one needs TransformerLens compatibility mode and checks it
with :func:`require_compat`: a model without it is refused with a :class:`~factlens.errors.ModeError` naming
the fix. Nothing is switched on behind your back, since the mode rewrites weights in place. Every model factlens
builds for analysis (:func:`factlens.load`, :func:`factlens.tiny`, :func:`factlens.full_size`) has it on by
default, twins and real weights alike, so swapping one for the other never moves a result. Training never uses
it (:func:`factlens.build_hf`, and :func:`factlens.bridge_from_hf`'s default ``compat=False``).

Example:
    >>> import tempfile, factlens
    >>> from factlens.tokenizers import gpt2_tokenizer
    >>> from factlens.loading import architecture, open_weights
    >>> folder = tempfile.mkdtemp()
    >>> factlens.build_hf("gpt2").save_pretrained(folder); gpt2_tokenizer().save_pretrained(folder)  # doctest: +ELLIPSIS
    (...)
    >>> architecture(folder)
    'gpt2'
    >>> weights = open_weights(folder)
    >>> type(weights.hf_model).__name__, weights.tokenizer(" Paris")["input_ids"]
    ('GPT2LMHeadModel', [6342])
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from factlens.errors import CheckpointError, ModeError, UnknownModelError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

SUPPORTED_TYPES = ("gpt2", "opt")
"""HF ``model_type`` values factlens runs (the architecture's ``config.json`` field)."""

TWINS = ("tiny-gpt2", "tiny-opt", "random-gpt2", "random-gpt2-medium", "random-gpt2-large", "random-opt-1.3b")
"""CLI names of the offline random-weight twins."""

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class Weights:
    """An opened checkpoint: the plain HF model, its own tokenizer, and where both came from.

    Attributes:
        hf_model: ``GPT2LMHeadModel`` or ``OPTForCausalLM`` in eval mode.
        tokenizer: The tokenizer saved with the weights.
        family: ``"gpt2"`` or ``"opt"`` (the config's ``model_type``).
        folder: The folder the files were read from (a snapshot folder for the HF cache).
        source: What the caller passed (a path or an HF id).
    """

    hf_model: torch.nn.Module
    tokenizer: object
    family: str
    folder: Path
    source: str


def snapshot_folder(path: str | os.PathLike, revision: str | None = None) -> Path:
    """The folder holding ``config.json`` for a local path: the path itself, or a snapshot of an HF cache repo.

    An HF cache repo folder (``.../hub/models--org--name``) resolves to ``snapshots/<hash>`` for ``revision``
    (default ``main``, via ``refs/``), or to its only snapshot.

    Example:
        >>> from factlens.loading import snapshot_folder
        >>> snapshot_folder("/no/such/folder")
        Traceback (most recent call last):
        ...
        factlens.errors.CheckpointError: ...
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is not a folder. Pass a save_pretrained folder, an HF cache "
                              "folder (models--org--name or its snapshots/<hash>), or an HF id such as 'gpt2'.")
    if (path / "config.json").is_file():
        return path
    snapshots = path / "snapshots"
    if snapshots.is_dir():
        ref = path / "refs" / (revision or "main")
        if ref.is_file() and (snapshots / ref.read_text().strip() / "config.json").is_file():
            return snapshots / ref.read_text().strip()
        if revision and (snapshots / revision / "config.json").is_file():
            return snapshots / revision
        found = sorted(p for p in snapshots.iterdir() if (p / "config.json").is_file())
        if len(found) == 1:
            return found[0]
        if found:
            raise CheckpointError(f"{str(path)!r} holds {len(found)} snapshots ({', '.join(p.name for p in found)}); "
                                  "pass revision=<hash> or the snapshots/<hash> folder itself.")
    raise CheckpointError(f"{str(path)!r} has no config.json: it is not a save_pretrained folder. Write one with "
                          "model.save_pretrained(folder) and tokenizer.save_pretrained(folder).")


def architecture(folder: str | os.PathLike) -> str:
    """The ``model_type`` of a checkpoint folder's ``config.json``; unsupported ones raise naming the supported.

    Example:
        >>> import json, tempfile, pathlib
        >>> from factlens.loading import architecture
        >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
        >>> architecture(d)
        Traceback (most recent call last):
        ...
        factlens.errors.UnknownModelError: ...
    """
    folder = snapshot_folder(folder)
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{folder / 'config.json'} is unreadable ({err}); re-save the model.") from err
    if model_type not in SUPPORTED_TYPES:
        raise UnknownModelError(
            f"{str(folder)!r} holds a {model_type!r} model; factlens supports the GPT-2 and OPT architectures "
            f"(config.json model_type {' or '.join(repr(t) for t in SUPPORTED_TYPES)}): GPT-2 small/medium/large, "
            "OPT-1.3B, and checkpoints of the same architectures.")
    return model_type


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The HF cache's snapshot folder of ``repo_id`` (with its ``config.json``), or ``None`` when not cached."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # malformed id: the caller's download attempt reports it
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def weights_not_found(name: str, reason: object = None) -> CheckpointError:
    """The error for weights that are neither on disk nor downloadable, naming the three ways out."""
    why = f" ({reason})" if reason else ""
    offline = " HF_HUB_OFFLINE is set, so nothing is downloaded." if _offline() else ""
    return CheckpointError(
        f"no weights for {name!r} in the Hugging Face cache and none could be downloaded{why}.{offline} "
        "Three ways out: (1) fill the HF cache on a machine with hub access "
        f"(`huggingface-cli download {name}`, then copy ~/.cache/huggingface or set HF_HOME); "
        "(2) pass a local folder: factlens.load('/path/to/folder') for a save_pretrained folder or an HF cache "
        "folder (models--org--name/snapshots/<hash>); (3) use a random-weight twin offline: factlens.tiny('gpt2'), "
        "factlens.full_size('gpt2'), or on the command line --model tiny-gpt2 / random-gpt2.")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def _quiet():
    """No transformers progress bars or INFO/WARNING chatter while opening a checkpoint."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def open_folder(folder: str | os.PathLike, *, dtype: torch.dtype | None = None, tokenizer=None,
                revision: str | None = None, source: str | None = None) -> Weights:
    """Open a save_pretrained / HF-cache folder: the HF model (eval mode) and the folder's own tokenizer.

    Args:
        folder: The folder, or an HF cache repo folder (see :func:`snapshot_folder`).
        dtype: Weight dtype (default: float32).
        tokenizer: Use this tokenizer instead of the folder's (e.g. weights saved without one).
    """
    from transformers import GPT2LMHeadModel, OPTForCausalLM

    folder = snapshot_folder(folder, revision)
    family = architecture(folder)
    cls = GPT2LMHeadModel if family == "gpt2" else OPTForCausalLM
    if tokenizer is None and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointError(
            f"{str(folder)!r} has weights but no tokenizer files ({', '.join(_TOKENIZER_FILES)}). factlens always "
            "uses the checkpoint's own tokenizer: save it there (tokenizer.save_pretrained(folder)) or pass "
            "tokenizer=AutoTokenizer.from_pretrained(<its source>).")
    try:
        with _quiet():
            hf_model, info = cls.from_pretrained(folder, dtype=dtype or torch.float32, local_files_only=True,
                                                 output_loading_info=True, ignore_mismatched_sizes=True)
    except OSError as err:  # weights missing
        raise CheckpointError(f"cannot read the checkpoint in {str(folder)!r}: {err}. Re-save it with "
                              "model.save_pretrained(folder).") from err
    except Exception as err:  # truncated or corrupt safetensors, unreadable shards: another library's error
        raise CheckpointError(f"cannot read the weights in {str(folder)!r} ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}): the file is truncated or corrupt. "
                              "Re-save it with model.save_pretrained(folder), or copy it again.") from err
    info = dict(info)
    info["unexpected_keys"] = set(info.get("unexpected_keys") or ()) | unread_keys(folder, hf_model)
    check_loading_info(folder, family, info)
    if tokenizer is None:
        tokenizer = _open_tokenizer(folder)
    check_vocabulary(folder, hf_model.config, tokenizer)
    return Weights(hf_model.eval(), tokenizer, family, folder, source or str(folder))


def check_loading_info(folder: Path, family: str, info: dict) -> None:
    """Refuse weights that do not match their config: missing, unexpected or mis-shaped tensors, named.

    ``info`` is transformers' loading report (``from_pretrained(..., output_loading_info=True)``); a model
    built from it would be partly random (missing or mis-shaped tensors are freshly initialised) or ignore
    weights (unexpected ones), so any entry is a :class:`~factlens.errors.CheckpointError`.
    """
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or (), key=str)
    errors = list(info.get("error_msgs") or ())
    if not (missing or unexpected or mismatched or errors):
        return

    def show(keys) -> str:
        keys = [k if isinstance(k, str) else f"{k[0]} (checkpoint {tuple(k[1])} vs config {tuple(k[2])})"
                if isinstance(k, tuple) and len(k) == 3 else str(k) for k in keys]
        return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) the config needs are missing from the weights ({show(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) in the weights are not in the model the config describes "
                     f"({show(unexpected)})")
    if mismatched:
        parts.append(f"{len(mismatched)} tensor(s) have another shape than the config says ({show(mismatched)})")
    if errors:
        parts.append("; ".join(map(str, errors))[:300])
    other = {"gpt2": "model.decoder.", "opt": "transformer."}[family]
    hint = ""
    if unexpected and sum(k.startswith(other) or k.startswith(other.split(".")[-2] + ".") for k in unexpected) > len(
            unexpected) // 2:
        hint = (f" The weights look like {'OPT' if family == 'gpt2' else 'GPT-2'} weights but config.json says "
                f"model_type {family!r}: fix model_type.")
    raise CheckpointError(
        f"the weights in {str(folder)!r} do not match its config.json: {'; '.join(parts)}. A model built from "
        f"them would be partly random or ignore weights.{hint} Fix config.json (n_layer / num_hidden_layers, "
        "vocab_size, n_positions / max_position_embeddings, widths) to describe the weights, or re-save both "
        "with model.save_pretrained(folder).")


_LEGACY_BUFFERS = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(masked_)?bias$")
"""GPT-2's causal-mask buffers, stored by old checkpoints (the hub's ``gpt2``) and rebuilt by the model."""


def unread_keys(folder: Path, hf_model: torch.nn.Module) -> set[str]:
    """Tensors in a folder's safetensors files that no parameter or buffer of ``hf_model`` reads.

    transformers ignores some stored keys by pattern (``attn.bias`` matches any key containing it), so its
    report can miss a stray tensor; this compares the stored names with the model's state dict directly.
    """
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return set()
    prefix = getattr(hf_model, "base_model_prefix", "")
    own = set(hf_model.state_dict())
    unread = set()
    for f in files:
        try:
            with safe_open(f, framework="pt") as handle:
                keys = list(handle.keys())
        except Exception:  # unreadable files were reported by from_pretrained already
            return set()
        for key in keys:
            candidates = {key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")}
            if not candidates & own and not _LEGACY_BUFFERS.match(key):
                unread.add(key)
    return unread


def _open_tokenizer(folder: Path):
    """The folder's own tokenizer; an unreadable tokenizer file is a CheckpointError naming it."""
    from transformers import AutoTokenizer

    try:
        with _quiet():
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # a corrupt tokenizer.json / vocab.json: JSON, tokenizers or OS errors
        files = [f for f in _TOKENIZER_FILES if (folder / f).is_file()]
        raise CheckpointError(
            f"cannot read the tokenizer in {str(folder)!r} ({', '.join(files)}): {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}. The file is corrupt or truncated: re-save it with "
            "tokenizer.save_pretrained(folder), or pass tokenizer=AutoTokenizer.from_pretrained(<its source>)."
        ) from err


def check_vocabulary(folder: Path, config, tokenizer) -> None:
    """Refuse a tokenizer whose ids run past the embedding (its vocabulary is larger than the weights')."""
    try:
        n_tok = len(tokenizer)
    except TypeError:
        return
    if n_tok > int(config.vocab_size):
        raise CheckpointError(
            f"the tokenizer in {str(folder)!r} has {n_tok} tokens but the weights embed {config.vocab_size}: ids "
            f"{config.vocab_size}..{n_tok - 1} would index past the embedding. Use the tokenizer saved with these "
            "weights (tokenizer.save_pretrained(folder) from the same model), or resize the embedding "
            "(model.resize_token_embeddings(len(tokenizer))) and re-save.")


def is_bios_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a factlens training run folder (or one of its checkpoints), not a save_pretrained one."""
    path = Path(path).expanduser()
    return path.is_dir() and ((path / "manifest.json").is_file() or (path / "checkpoints").is_dir()
                              or (path / "metrics.jsonl").is_file())


def open_weights(source: str | os.PathLike, *, revision: str | None = None, dtype: torch.dtype | None = None,
                 tokenizer=None) -> Weights:
    """Open a folder, an HF cache path or an HF id (cache first, then the hub); see the module docstring.

    Raises:
        UnknownModelError: The checkpoint is not GPT-2 or OPT.
        CheckpointError: Nothing found (offline with an empty cache): the message names the three ways out.
    """
    text = os.fspath(source)
    if is_bios_run(text):
        raise CheckpointError(
            f"{text!r} is a factlens training run (checkpoints, manifest.json or metrics.jsonl), not a "
            "save_pretrained folder. Load it with factlens.bios.load_bridge(run_dir, step=None) (the task "
            "tokenizer and the checkpoint's config), or factlens.bios.load_hf(run_dir) for the plain HF model.")
    if Path(text).expanduser().exists():
        return open_folder(text, dtype=dtype, tokenizer=tokenizer, revision=revision, source=text)
    cached = cached_snapshot(text, revision)
    if cached is not None:
        return open_folder(cached, dtype=dtype, tokenizer=tokenizer, source=text)
    if _offline():
        raise weights_not_found(text)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        with _quiet():
            folder = snapshot_download(text, revision=revision, allow_patterns=patterns)
            if not any(Path(folder).glob("*.safetensors")):  # older repos ship only pytorch_model.bin
                folder = snapshot_download(text, revision=revision, allow_patterns=[*patterns, "pytorch_model*.bin"])
    except Exception as err:  # no network, unknown repo, gated repo: all end the same way for the user
        raise weights_not_found(text, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    return open_folder(folder, dtype=dtype, tokenizer=tokenizer, source=text)


def is_compat(model: TransformerBridge) -> bool:
    """Whether a bridge runs in TransformerLens compatibility mode (folded LN, centred weights)."""
    return bool(getattr(model, "compatibility_mode", False))


def require_compat(model: TransformerBridge, analysis: str = "this analysis") -> None:
    """Refuse a bridge that is not in compatibility mode, naming the fix (the rule in the module docstring).

    Example:
        >>> import factlens
        >>> from factlens.loading import require_compat
        >>> require_compat(factlens.tiny("gpt2"))                     # twins are built in compat mode
        >>> require_compat(factlens.tiny("gpt2", compat=False), "the logit lens")
        Traceback (most recent call last):
        ...
        factlens.errors.ModeError: ...
    """
    if not hasattr(model, "cfg") or is_compat(model):
        return
    raise ModeError(
        f"{analysis} needs TransformerLens compatibility mode (folded LayerNorm, centred weights: the numerics "
        "the Lv et al. analyses are defined in), and this model is not in it. Fix: build it with compat=True "
        "(factlens.load(...), factlens.tiny(...) and factlens.full_size(...) do by default), or call "
        "model.enable_compatibility_mode() once on a model you will not train.")


def is_twin(model: TransformerBridge) -> bool:
    """Whether a bridge is one of factlens's random-weight twins (:func:`factlens.tiny`, :func:`factlens.full_size`)."""
    return bool(getattr(model, "factlens_random_weights", False))


__all__ = ["SUPPORTED_TYPES", "TWINS", "Weights", "architecture", "cached_snapshot", "check_loading_info", "check_vocabulary", "is_bios_run", "is_compat", "is_twin",
           "open_folder", "open_weights", "require_compat", "snapshot_folder", "weights_not_found"]
