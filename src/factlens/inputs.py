"""What a model is built with and what it is fed: devices, dtypes, head counts, token ids and lengths.

Bad values here used to surface as raw tracebacks far from their cause: a device typo at the first forward
pass, ``n_head=5`` with ``d_model=64`` deep in a reshape, a token id past the vocabulary as an ``IndexError``
in an embedding, a prompt longer than the context as a CUDA assert. factlens checks them where they enter:

- :func:`check_device` and :func:`resolve_dtype` run at the top of every model builder (``factlens.tiny``,
  ``full_size``, ``load``, ``build_hf``, ``bridge_from_hf``);
- :func:`check_heads` runs on every config :func:`factlens.models.build_hf` builds;
- :func:`install_input_checks` (called by :func:`factlens.prepare`) checks every forward pass of a prepared
  bridge before it runs: token ids in ``0..vocab-1`` and positions (KV cache included) inside the context.

**dtypes** may be given as ``torch.float32`` or as a string: ``"float32"``/``"fp32"``/``"float"``,
``"float16"``/``"fp16"``/``"half"``, ``"bfloat16"``/``"bf16"``, ``"float64"``/``"double"`` (``"torch.float16"``
works too). Anything else is a :class:`~factlens.errors.ConfigError` listing these.

Example:
    >>> import torch
    >>> from factlens.inputs import check_device, resolve_dtype
    >>> resolve_dtype("bf16"), check_device("cpu")
    (torch.bfloat16, device(type='cpu'))
    >>> check_device("cdua")
    Traceback (most recent call last):
    ...
    factlens.errors.ConfigError: device='cdua' is not a device torch knows; pass 'cpu', 'cuda', 'cuda:0' or 'mps' (or a torch.device).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from factlens.errors import ConfigError, ShapeError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def resolve_dtype(dtype: torch.dtype | str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """A floating-point ``torch.dtype`` from a dtype or its name (see the module docstring); ``None`` → default."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype={dtype} is not a floating-point dtype; model weights need one of "
                              "torch.float32, torch.float16, torch.bfloat16, torch.float64")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    raise ConfigError(f"dtype={dtype!r} is not a dtype factlens knows; pass a torch dtype such as torch.float16, "
                      f"or one of the names {sorted(DTYPES)}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in for data of ``dtype``: float32 for narrower floats (and non-floats), else ``dtype``.

    Softmaxes, comparisons and reductions upcast fp16/bf16 to float32 for accuracy, but never round a float64
    model's numbers down: an fp64 model stays fp64 end to end.

    Example:
        >>> import torch
        >>> from factlens.inputs import compute_dtype
        >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    if dtype.is_floating_point and torch.finfo(dtype).bits > 32:
        return dtype
    return torch.float32


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in :func:`compute_dtype` of its dtype (float32, or float64 when it is float64).

    Example:
        >>> import torch
        >>> from factlens.inputs import at_least_fp32
        >>> at_least_fp32(torch.ones(2, dtype=torch.float16)).dtype, at_least_fp32(torch.ones(2).double()).dtype
        (torch.float32, torch.float64)
    """
    return tensor.to(compute_dtype(tensor.dtype))


def check_device(device: str | torch.device | int | None) -> torch.device | None:
    """``device`` as a ``torch.device`` after checking that it exists on this machine; ``None`` passes through.

    Raises:
        ConfigError: A string torch cannot parse, ``cuda`` without CUDA, a CUDA index past the GPUs there
            are, or ``mps`` where MPS is not available.
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device={device!r} is not a device torch knows; pass 'cpu', 'cuda', 'cuda:0' or 'mps' "
                          "(or a torch.device).") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={str(device)!r} requested but CUDA is not available; pass device='cpu'.")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"device={str(device)!r} but this machine has {n} CUDA device(s); pass one of "
                              f"{[f'cuda:{i}' for i in range(n)]}.")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device={str(device)!r} requested but MPS is not available; pass device='cpu'.")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise ConfigError(f"device={str(device)!r}: factlens runs models on 'cpu', 'cuda' or 'mps'.")
    return dev


def default_device(device: str | torch.device | int | None = None) -> torch.device:
    """``device`` checked (see :func:`check_device`), else CUDA when available, else CPU: the one default device
    of factlens's functions and commands.

    Example:
        >>> import torch
        >>> from factlens.inputs import default_device
        >>> default_device("cpu"), default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
        (device(type='cpu'), True)
    """
    checked = check_device(device)
    return checked if checked is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_heads(config) -> None:
    """Refuse an HF GPT-2/OPT config whose head count does not divide its width (or is not positive)."""
    if config.model_type == "gpt2":
        width, heads, names = config.n_embd, config.n_head, ("n_embd", "n_head")
        layers, layer_name = config.n_layer, "n_layer"
    else:
        width, heads, names = config.hidden_size, config.num_attention_heads, ("hidden_size", "num_attention_heads")
        layers, layer_name = config.num_hidden_layers, "num_hidden_layers"
    if not isinstance(layers, int) or layers < 1:
        raise ConfigError(f"{layer_name}={layers!r}; a model needs at least one layer ({layer_name} >= 1).")
    if not isinstance(heads, int) or heads < 1 or not isinstance(width, int) or width < 1:
        raise ConfigError(f"{names[1]}={heads!r}, {names[0]}={width!r}; both must be positive integers.")
    if width % heads:
        divisors = [h for h in range(1, min(width, 64) + 1) if width % h == 0]
        raise ConfigError(f"{names[0]}={width} is not divisible by {names[1]}={heads}, so the heads cannot split "
                          f"the residual stream evenly; pick {names[1]} from {divisors} (or change {names[0]}).")


# ------------------------------------------------------------------------------------------- config keys
TL_TO_HF = {
    "gpt2": {"n_layers": "n_layer", "n_heads": "n_head", "d_model": "n_embd", "d_mlp": "n_inner",
             "n_ctx": "n_positions", "d_vocab": "vocab_size", "act_fn": "activation_function"},
    "opt": {"n_layers": "num_hidden_layers", "n_heads": "num_attention_heads", "d_model": "hidden_size",
            "d_mlp": "ffn_dim", "n_ctx": "max_position_embeddings", "d_vocab": "vocab_size",
            "act_fn": "activation_function", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
            "n_embd": "hidden_size", "n_inner": "ffn_dim", "n_positions": "max_position_embeddings"},
}
"""TransformerLens (and, for OPT, GPT-2) spellings of config fields → the HF field each family reads."""


def check_keys(given, known, where: str, renames: dict[str, str] | None = None) -> None:
    """Refuse keys nothing reads, suggesting the right name (``renames`` first, then the closest known key).

    Example:
        >>> from factlens.inputs import check_keys
        >>> check_keys({"n_layers": 4}, {"n_layer", "n_head"}, "tiny('gpt2')", {"n_layers": "n_layer"})
        Traceback (most recent call last):
        ...
        factlens.errors.ConfigError: tiny('gpt2') got unknown key 'n_layers' (did you mean 'n_layer'?); nothing reads it, so it would be silently ignored. Known keys: n_head, n_layer.
    """
    import difflib

    known = sorted(set(known))
    for key in given:
        if key in known:
            continue
        guess = (renames or {}).get(key)
        if guess is None:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            guess = close[0] if close else None
        hint = f" (did you mean {guess!r}?)" if guess else ""
        shown = ", ".join(known) if len(known) <= 30 else ", ".join(known[:30]) + ", ..."
        raise ConfigError(f"{where} got unknown key {key!r}{hint}; nothing reads it, so it would be silently "
                          f"ignored. Known keys: {shown}.")


def refuse_unknown_keys(cls):
    """Class decorator (outside ``@dataclass``): unknown keyword arguments are a ConfigError with "did you mean",
    not a ``TypeError``.

    Example:
        >>> from dataclasses import dataclass
        >>> from factlens.inputs import refuse_unknown_keys
        >>> @refuse_unknown_keys
        ... @dataclass
        ... class Settings:
        ...     steps: int = 1
        >>> Settings(step=3)
        Traceback (most recent call last):
        ...
        factlens.errors.ConfigError: Settings(...) got unknown key 'step' (did you mean 'steps'?); nothing reads it, so it would be silently ignored. Known keys: steps.
    """
    import dataclasses
    import functools

    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls) if f.init]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        check_keys(kwargs, names, f"{cls.__name__}(...)")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` if it is an integer >= 0 (what numpy's and torch's generators take); else a ConfigError.

    Example:
        >>> from factlens.inputs import check_seed
        >>> check_seed(-1)
        Traceback (most recent call last):
        ...
        factlens.errors.ConfigError: seed=-1; pass an integer >= 0 (e.g. seed=0).
    """
    import numbers

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"{name}={seed!r}; pass an integer >= 0 (e.g. {name}=0).")
    return int(seed)


def hf_config_keys(family: str) -> set[str]:
    """Every field name an HF GPT-2 / OPT config reads (its defaults and aliases)."""
    from transformers import GPT2Config, OPTConfig

    cls = GPT2Config if family == "gpt2" else OPTConfig
    base = cls()
    return set(base.to_dict()) | set(cls.attribute_map) | {"dtype", "torch_dtype", "name_or_path"}


def check_config_overrides(family: str, overrides, where: str) -> None:
    """Refuse HF config overrides of ``family`` that the config does not read (TL's spelling gets the HF name)."""
    check_keys(overrides, hf_config_keys(family), where, TL_TO_HF.get(family))


# ------------------------------------------------------------------------------------------- forward passes
_HANDLE = "_factlens_input_check"


def _context_and_vocab(hf_model) -> tuple[int, int]:
    config = hf_model.config
    n_ctx = config.n_positions if config.model_type == "gpt2" else config.max_position_embeddings
    return int(n_ctx), int(config.vocab_size)


def check_tokens(input_ids: torch.Tensor, vocab_size: int, n_ctx: int, past: int = 0) -> None:
    """Refuse token ids outside ``0..vocab_size-1`` and sequences that run past the context ``n_ctx``.

    ``past`` is the number of positions already in the KV cache (incremental decoding).

    Example:
        >>> import torch
        >>> from factlens.inputs import check_tokens
        >>> check_tokens(torch.tensor([[1, 2, 3]]), vocab_size=50, n_ctx=4, past=2)
        Traceback (most recent call last):
        ...
        factlens.errors.ShapeError: 3 new token(s) after 2 cached ones reach position 5, but the model's context is 4 positions (n_ctx); truncate the prompt (e.g. tokens[:, -4:]) or generate fewer tokens (max_new_tokens).
    """
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ShapeError(f"token ids have dtype {input_ids.dtype}; pass integer ids (model.to_tokens(text)).")
    if input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ShapeError(f"token id {bad} is outside the model's vocabulary (0..{vocab_size - 1}); tokenize "
                             "with this model's own tokenizer (model.to_tokens(text)): ids from another tokenizer "
                             "or vocabulary do not fit.")
    total = past + input_ids.shape[-1]
    if total > n_ctx:
        what = f"{input_ids.shape[-1]} new token(s) after {past} cached ones reach position {total}" if past else \
            f"a sequence of {total} tokens"
        raise ShapeError(f"{what}, but the model's context is {n_ctx} positions (n_ctx); truncate the prompt "
                         f"(e.g. tokens[:, -{n_ctx}:]) or generate fewer tokens (max_new_tokens).")


def _past_length(kwargs: dict) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except (AttributeError, TypeError):
        return 0


def install_input_checks(bridge: TransformerBridge) -> bool:
    """Check every forward pass of ``bridge``'s HF model with :func:`check_tokens` before it runs. Idempotent.

    Returns:
        ``True`` when the check was installed now, ``False`` when it already was.
    """
    hf_model = bridge.original_model
    if getattr(hf_model, _HANDLE, None) is not None:
        return False
    n_ctx, vocab = _context_and_vocab(hf_model)

    def pre_hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor):
            check_tokens(ids, vocab, n_ctx, _past_length(kwargs))
        return None

    handle = hf_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    object.__setattr__(hf_model, _HANDLE, handle)
    return True


__all__ = ["DTYPES", "TL_TO_HF", "at_least_fp32", "check_config_overrides", "check_device", "check_heads", "check_keys",
           "check_seed", "check_tokens", "compute_dtype", "hf_config_keys", "install_input_checks",
           "refuse_unknown_keys", "resolve_dtype"]
