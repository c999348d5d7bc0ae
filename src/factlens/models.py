"""Loading real models and building random-weight twins, all as TransformerLens 4.3 ``TransformerBridge``s.

Supported: GPT-2 small / medium / large and OPT-1.3B (HF ids accepted too). Every bridge factlens returns
has been through :func:`prepare`, which makes TL's own ``hook_pattern`` / ``hook_attn_scores`` hooks take
effect on OPT as on GPT-2 (see :mod:`factlens.attention`).

**Compatibility mode** (TL's ``fold_ln`` + weight centring). The rule (:mod:`factlens.loading`): every Lv et al.
analysis needs it and refuses a model without it, naming the fix; :func:`load`, :func:`tiny` and
:func:`full_size` all turn it on by default, so a twin and the real model give results in the same numerics.
It changes no logits. It edits weights in place, must be applied once only, and changes what the parameters
mean, so **training never uses it**: the biography trainer trains plain HF models (:func:`build_hf`) and wraps
copies with :func:`bridge_from_hf` (``compat=False`` by default). Weights on disk (a ``save_pretrained``
folder, the HF cache) are opened by :mod:`factlens.loading`, always with their own tokenizer.

TransformerLens traps handled here (TransformerLens 4.3's behaviour, checked by ``tests/test_models.py``):

- TL reloads tokenizers through ``AutoTokenizer`` from their ``name_or_path``; in-memory tokenizers fail.
  factlens's tokenizers are always saved to a directory first (:mod:`factlens.tokenizers`).
- Booting rewrites the wrapped HF model in place (GPT-2's ``attn`` becomes a ``JointQKVAttentionBridge``)
  and ``hf.save_pretrained()`` then fails. :func:`bridge_from_hf` therefore wraps a *copy*; checkpoints are
  saved from the plain HF model or via ``bridge.state_dict()``.
- Booting forces eager attention; :func:`prepare` re-points OPT at factlens's function.

Example:
    >>> import factlens
    >>> model = factlens.tiny("gpt2")          # random weights, real GPT-2 layer types and tokenizer
    >>> model.cfg.n_layers, model.cfg.n_heads
    (2, 4)
    >>> model.to_tokens(" Paris", prepend_bos=False).tolist()
    [[6342]]
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM, PreTrainedModel

from factlens.attention import install_bridge_hooks, use_factlens_attention
from factlens.compat import enable_compatibility_mode
from factlens.errors import ConfigError, UnknownModelError
from factlens.generation import install_generate_checks, install_kv_cache_fix
from factlens.inputs import (
    check_config_overrides,
    check_device,
    check_heads,
    default_device,
    install_input_checks,
    resolve_dtype,
)
from factlens.tokenizers import gpt2_tokenizer, opt_style_tokenizer

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@dataclass(frozen=True)
class ModelSpec:
    """A supported model: its HF id, family and the full-size architecture."""

    name: str
    hf_id: str
    family: str  # "gpt2" | "opt"
    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int
    n_ctx: int
    vocab_size: int


SUPPORTED: dict[str, ModelSpec] = {
    "gpt2": ModelSpec("gpt2", "openai-community/gpt2", "gpt2", 12, 12, 768, 3072, 1024, 50257),
    "gpt2-medium": ModelSpec("gpt2-medium", "openai-community/gpt2-medium", "gpt2", 24, 16, 1024, 4096, 1024, 50257),
    "gpt2-large": ModelSpec("gpt2-large", "openai-community/gpt2-large", "gpt2", 36, 20, 1280, 5120, 1024, 50257),
    "opt-1.3b": ModelSpec("opt-1.3b", "facebook/opt-1.3b", "opt", 24, 32, 2048, 8192, 2048, 50272),
}
_ALIASES = {
    "gpt2-small": "gpt2",
    "openai-community/gpt2": "gpt2",
    "openai-community/gpt2-medium": "gpt2-medium",
    "openai-community/gpt2-large": "gpt2-large",
    "facebook/opt-1.3b": "opt-1.3b",
    "opt-1.3B": "opt-1.3b",
}
FAMILIES = ("gpt2", "opt")


def did_you_mean(name: str, extra: tuple[str, ...] = ()) -> str:
    """`` (did you mean 'gpt2-small'?)`` for a misspelt model name, else ``""``.

    Example:
        >>> from factlens.models import did_you_mean
        >>> did_you_mean("gpt2-smal")
        " (did you mean 'gpt2-small'?)"
        >>> did_you_mean("llama-70b")
        ''
    """
    known = [*SUPPORTED, *(a for a in _ALIASES if "/" not in a), *extra]
    close = difflib.get_close_matches(str(name).lower(), known, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve(name: str) -> ModelSpec:
    """The :class:`ModelSpec` for a short name or HF id; :class:`UnknownModelError` lists the choices."""
    key = _ALIASES.get(name, _ALIASES.get(name.lower(), name.lower()))
    if key not in SUPPORTED:
        choices = ", ".join(list(SUPPORTED) + sorted(_ALIASES))
        raise UnknownModelError(
            f"factlens does not support model {name!r}{did_you_mean(name)}. Supported: {choices}. For a random-weight twin of an "
            "architecture use factlens.tiny('gpt2'|'opt') or factlens.full_size(name)."
        )
    return SUPPORTED[key]


def prepare(bridge: TransformerBridge):
    """Make a bridge factlens-ready: TL pattern/score hooks take effect on OPT too. Idempotent.

    Also swaps GPT-2's element-wise ``gelu_new`` for the same function as one kernel (:func:`fuse_activations`).

    Returns the same bridge, with ``bridge.factlens_family`` set to ``"gpt2"`` or ``"opt"``.
    """
    hf_type = getattr(bridge.original_model.config, "model_type", "")
    if hf_type not in FAMILIES:
        raise UnknownModelError(
            f"factlens supports the GPT-2 and OPT architectures; this bridge wraps {hf_type!r}. "
            "Use factlens.load('gpt2'|'gpt2-medium'|'gpt2-large'|'opt-1.3b')."
        )
    install_bridge_hooks(bridge)
    fuse_activations(bridge.original_model)
    install_kv_cache_fix(bridge)
    install_generate_checks(bridge)
    install_input_checks(bridge)
    bridge.factlens_family = hf_type
    return bridge


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, in either order."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def boot(name: str, hf_model: PreTrainedModel | None = None, tokenizer=None, device=None, compat: bool = False,
          **boot_kwargs):
    """``TransformerBridge.boot_transformers`` (quietly), then :func:`prepare` and optional compatibility mode:
    the one boot sequence of every factlens bridge."""
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings(), _quiet_transformers():
        warnings.simplefilter("ignore", UserWarning)
        bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer, device=device,
                                                     **boot_kwargs)
    prepare(bridge)
    if compat:
        enable_compatibility_mode(bridge)  # TL's, processed part by part (factlens.compat)
    return bridge.eval()


class _quiet_transformers:
    """Silence transformers' INFO/WARNING chatter while booting offline models."""

    def __enter__(self):
        self.logger = logging.getLogger("transformers")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def load(name: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None, *,
         compat: bool = True, revision: str | None = None, tokenizer=None, **boot_kwargs):
    """Load pretrained GPT-2 / OPT weights as a prepared bridge: from a folder, the HF cache or the hub.

    Args:
        name: a local ``save_pretrained`` folder, an HF cache folder (``models--org--name`` or its
            ``snapshots/<hash>``), ``gpt2``/``gpt2-medium``/``gpt2-large``/``opt-1.3b``, or any HF id of a GPT-2
            or OPT checkpoint (read from the HF cache when there, else downloaded). See :mod:`factlens.loading`.
        device: torch device; default CUDA when available.
        dtype: weight dtype (default float32).
        compat: enable TL compatibility mode (fold LN, centre weights), which every Lv analysis requires
            (:func:`factlens.loading.require_compat`); do not train a model loaded this way.
        revision: an HF revision (branch/tag/commit), or the snapshot of an HF cache folder.
        tokenizer: override the checkpoint's own tokenizer (default: the one saved with the weights).
        **boot_kwargs: passed on to ``TransformerBridge.boot_transformers``.

    Raises:
        UnknownModelError: not a GPT-2/OPT checkpoint (the message lists the supported models).
        CheckpointError: no weights found (e.g. offline with an empty cache); the message names the ways out.

    Example:
        >>> import factlens
        >>> model = factlens.load("gpt2")  # needs the hub or a filled HF cache    # doctest: +SKIP
        >>> model = factlens.load("/path/to/save_pretrained_folder")             # doctest: +SKIP
    """
    from factlens.loading import open_weights

    device, dtype = check_device(device), resolve_dtype(dtype)
    text = os.fspath(name)
    source = text
    if not Path(text).expanduser().exists():
        try:
            source = resolve(text).hf_id
        except UnknownModelError:
            if "/" not in text:  # not a path, not an HF id: a misspelt short name
                raise UnknownModelError(
                    f"factlens does not know model {text!r}{did_you_mean(text)} and there is no folder of that "
                    f"name. Supported: "
                    f"{', '.join(SUPPORTED)} (or their HF ids), any HF id or local save_pretrained folder of a "
                    "GPT-2 or OPT checkpoint, or a random-weight twin: factlens.tiny('gpt2'|'opt'), "
                    "factlens.full_size(name).") from None
    weights = open_weights(source, revision=revision, dtype=dtype, tokenizer=tokenizer)
    device = str(default_device(device))
    bridge = boot(source, weights.hf_model.to(device), weights.tokenizer, device, compat, **boot_kwargs)
    bridge.factlens_random_weights = False
    bridge.factlens_name = text
    return bridge


def hf_config(arch: str, *, full_size: bool = False, **overrides):
    """An HF ``GPT2Config``/``OPTConfig``: tiny defaults for a family, or a supported model's full size.

    ``hf_config("gpt2")`` is the tiny twin; ``hf_config("gpt2", full_size=True)`` GPT-2 small;
    ``hf_config("opt-1.3b")`` (a model name that is not a family) is always full size.

    Overrides use HF field names (``n_layer``, ``n_head``, ``n_embd``... for GPT-2; ``num_hidden_layers``,
    ``num_attention_heads``, ``hidden_size``, ``ffn_dim``... for OPT). Dropout defaults to 0.
    """
    if arch in FAMILIES and not full_size:
        spec = None
    else:
        spec = resolve(arch)
        arch = spec.family
    check_config_overrides(arch, overrides, f"the {arch} config (HF field names, e.g. "
                           f"{'n_layer' if arch == 'gpt2' else 'num_hidden_layers'}=3)")
    if arch == "gpt2":
        base = dict(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=4, n_inner=256,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=50256, eos_token_id=50256)
        if spec:
            base.update(n_positions=spec.n_ctx, n_embd=spec.d_model, n_layer=spec.n_layers, n_head=spec.n_heads,
                        n_inner=None, vocab_size=spec.vocab_size)
        base.update(_special_ids(overrides))
        base.update(overrides)
        return GPT2Config(**base)
    if arch == "opt":
        base = dict(vocab_size=50272, max_position_embeddings=128, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, ffn_dim=256, word_embed_proj_dim=64, do_layer_norm_before=True,
                    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
                    pad_token_id=50258, bos_token_id=50257, eos_token_id=50257, enable_bias=True)
        if spec:
            base.update(max_position_embeddings=spec.n_ctx, hidden_size=spec.d_model, word_embed_proj_dim=spec.d_model,
                        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, ffn_dim=spec.d_mlp,
                        vocab_size=spec.vocab_size)
        base.update(_special_ids(overrides))
        base.update(overrides)
        if base.get("word_embed_proj_dim") != base["hidden_size"] and "word_embed_proj_dim" not in overrides:
            base["word_embed_proj_dim"] = base["hidden_size"]
        return OPTConfig(**base)
    raise UnknownModelError(f"unknown architecture {arch!r}: use 'gpt2' or 'opt' (or a supported model name).")


def _special_ids(overrides: dict) -> dict:
    """With a custom ``vocab_size``, special ids default to factlens's task-vocab convention (pad 0, bos 1, eos 2)."""
    if "vocab_size" not in overrides:
        return {}
    return {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def fuse_activations(hf_model: torch.nn.Module) -> int:
    """Swap HF's element-wise ``NewGELUActivation`` (GPT-2's ``gelu_new``) for ``GELUTanh``, the same function.

    ``gelu_new`` is ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` written as seven element-wise passes (and
    as many in the backward pass); ``GELUTanh`` is ``F.gelu(x, approximate="tanh")``, one fused kernel, equal
    to float rounding (2.4e-7 at most on N(0, 3²) inputs), as TransformerLens's own native backend computes
    ``gelu_new``. A small GPT-2's CPU training step is about 1.2× faster with it. Idempotent; the config
    keeps ``activation_function="gelu_new"``.

    Returns:
        The number of activations swapped.

    Example:
        >>> from factlens import build_hf
        >>> from factlens.models import fuse_activations
        >>> hf = build_hf("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=100)
        >>> type(hf.transformer.h[0].mlp.act).__name__, fuse_activations(hf)
        ('GELUTanh', 0)
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    n = 0
    for module in list(hf_model.modules()):
        if isinstance(getattr(module, "act", None), NewGELUActivation):
            module.act = GELUTanh()
            n += 1
    return n


def _factlens_model(model: PreTrainedModel) -> PreTrainedModel:
    """A freshly built HF model on factlens attention, with the fused GELU, marked as factlens's own."""
    use_factlens_attention(model)
    fuse_activations(model)
    model._factlens_built = True  # random init by factlens: factlens's BPE is its tokenizer (bridge_from_hf)
    return model


def build_hf(arch: str, *, seed: int = 0, dtype: torch.dtype | str = torch.float32, full_size: bool = False,
             **overrides) -> PreTrainedModel:
    """A plain HF ``GPT2LMHeadModel`` / ``OPTForCausalLM`` with random weights, on factlens attention.

    This is the model the biography trainer trains: stock HF layers, SDPA attention when nothing is
    patched (:mod:`factlens.attention`), no TransformerLens overhead.

    Example:
        >>> from factlens import build_hf
        >>> hf = build_hf("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=100)
        >>> type(hf).__name__, hf.config._attn_implementation
        ('GPT2LMHeadModel', 'factlens')
    """
    dtype = resolve_dtype(dtype)
    config = hf_config(arch, full_size=full_size, **overrides)
    check_heads(config)
    if config.model_type == "opt" and not config.do_layer_norm_before:
        raise ConfigError("post-norm OPT (opt-350m style) is not supported; keep do_layer_norm_before=True.")
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        cls = GPT2LMHeadModel if config.model_type == "gpt2" else OPTForCausalLM
        model = cls(config).to(dtype)
    return _factlens_model(model)


def from_config(config) -> PreTrainedModel:
    """An HF GPT-2/OPT model (random init, factlens attention) from an HF config or its ``to_dict()``."""
    from transformers import AutoConfig

    if isinstance(config, dict):  # a stored config (to_dict()): fields of other transformers versions are kept
        config = AutoConfig.for_model(**config)
    if config.model_type not in FAMILIES:
        raise UnknownModelError(f"factlens trains GPT-2 and OPT models, got {config.model_type!r}.")
    cls = GPT2LMHeadModel if config.model_type == "gpt2" else OPTForCausalLM
    return _factlens_model(cls(config))


def _tokenizer_for(family: str):
    return gpt2_tokenizer() if family == "gpt2" else opt_style_tokenizer()


def bridge_from_hf(hf_model: PreTrainedModel, tokenizer=None, *, device=None, compat: bool = False,
                   copy_model: bool = True):
    """Wrap an HF GPT-2/OPT model (e.g. one trained by factlens) in a prepared bridge.

    Args:
        hf_model: the model. Booting rewrites a model in place, so it is deep-copied unless
            ``copy_model=False``.
        tokenizer: its tokenizer. Default: the tokenizer saved with the model (its ``name_or_path`` folder
            or HF id, from disk only); factlens's offline GPT-2 / OPT-style BPE only for factlens's own
            random-weight models (:func:`build_hf`). Anything else must pass its tokenizer: a real OPT
            checkpoint's ids differ from GPT-2's.
        device: where the bridge lives (default: the model's device).
        compat: enable TL compatibility mode on the copy (the Lv analyses require it).
    """
    device = check_device(device)
    family = hf_model.config.model_type
    if family not in FAMILIES:
        raise UnknownModelError(f"bridge_from_hf supports GPT-2 and OPT models, got {family!r}.")
    if tokenizer is None:
        tokenizer = _own_tokenizer(hf_model, family)
    model = copy.deepcopy(hf_model) if copy_model else hf_model
    device = device or next(model.parameters()).device
    name = "openai-community/gpt2" if family == "gpt2" else "facebook/opt-125m"
    return boot(name, model, tokenizer, device, compat)


def _own_tokenizer(hf_model: PreTrainedModel, family: str):
    """The tokenizer that belongs to ``hf_model``: factlens's BPE for factlens's random models, else its own."""
    if getattr(hf_model, "_factlens_built", False):
        return _tokenizer_for(family)
    source = getattr(hf_model, "name_or_path", "") or getattr(hf_model.config, "name_or_path", "")
    if source:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError, TypeError):
            pass
    raise ConfigError(
        f"bridge_from_hf cannot tell this {family} model's tokenizer (name_or_path={source!r} has none on disk). "
        "Pass it: bridge_from_hf(model, AutoTokenizer.from_pretrained(<where the model came from>)); factlens's "
        "GPT-2 BPE is substituted only for factlens's own random-weight models (factlens.build_hf).")


def tiny(arch: str = "gpt2", *, seed: int = 0, compat: bool = True, device=None, **overrides):
    """A small random-init bridge of the real GPT-2 or OPT architecture, offline, with the real BPE.

    Defaults: 2 layers, 4 heads, d_model 64, d_mlp 256, context 128, the GPT-2 vocabulary (so real
    token ids such as ``" Paris" = 6342`` apply). HF field names override (``n_layer=3`` for GPT-2,
    ``num_hidden_layers=3`` for OPT).

    Example:
        >>> from factlens import tiny
        >>> tiny("opt").cfg.n_layers
        2
    """
    if arch not in FAMILIES:
        raise UnknownModelError(f"tiny() builds 'gpt2' or 'opt' twins, got {arch!r}.")
    device = check_device(device)
    hf = build_hf(arch, seed=seed, **overrides).eval()
    bridge = bridge_from_hf(hf, device=device, compat=compat, copy_model=False)
    bridge.factlens_random_weights = True  # reports say so, and never draw the paper's numbers beside it
    bridge.factlens_name = f"tiny-{arch}"
    return bridge


def full_size(name: str, *, seed: int = 0, compat: bool = True, device=None, dtype=torch.float32):
    """A random-weight bridge with the full-size config of a supported model (offline).

    For shape tests and benchmarks: ``full_size("gpt2-large").cfg.n_layers == 36``. OPT-1.3B in fp32 needs
    about 5.3 GB.
    """
    spec = resolve(name)
    device, dtype = check_device(device), resolve_dtype(dtype)
    hf = build_hf(spec.name, seed=seed, dtype=dtype, full_size=True).eval()
    bridge = bridge_from_hf(hf, device=device, compat=compat, copy_model=False)
    bridge.factlens_random_weights = True
    bridge.factlens_name = f"random-{spec.name}"
    return bridge


def family_of(model: TransformerBridge | PreTrainedModel) -> str:
    """``"gpt2"`` or ``"opt"`` for a bridge or HF model."""
    config = getattr(model, "original_model", model).config
    return config.model_type
