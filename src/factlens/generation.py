"""KV-cache generation on factlens-prepared GPT-2 bridges: the cache reaches TransformerLens's attention.

transformers 5.2x passes the KV cache to attention modules as ``cache=``; TransformerLens 4.3's
``AttentionBridge._update_kv_cache`` (used by GPT-2's ``JointQKVAttentionBridge``, which recomputes attention
itself) reads only ``past_key_values``/``layer_past``. On a stock GPT-2 bridge every cached decoding step
therefore attends to the new token alone, and ``model.generate(...)`` silently returns wrong tokens (OPT is
unaffected: HF's own ``OPTAttention`` updates the cache). :func:`install_kv_cache_fix` wraps each attention
bridge's ``_update_kv_cache`` so that a ``cache=`` keyword is read as ``past_key_values``;
:func:`factlens.prepare` calls it, so every bridge factlens builds or loads generates the same tokens with and
without the cache.

Example:
    >>> import factlens
    >>> model = factlens.tiny("gpt2")
    >>> tokens = model.to_tokens("The capital of France is")
    >>> cached = model.generate(tokens, max_new_tokens=4, do_sample=False, use_past_kv_cache=True, verbose=False)
    >>> plain = model.generate(tokens, max_new_tokens=4, do_sample=False, use_past_kv_cache=False, verbose=False)
    >>> bool((cached == plain).all())
    True
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

_FLAG = "_factlens_kv_cache_fix"


def _wrap(attn) -> None:
    original = attn._update_kv_cache  # the bound method of the class

    def update_kv_cache(k, v, **kwargs: Any):
        if kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None \
                and kwargs.get("cache") is not None:
            kwargs["past_key_values"] = kwargs["cache"]
        return original(k, v, **kwargs)

    object.__setattr__(attn, "_update_kv_cache", update_kv_cache)
    object.__setattr__(attn, _FLAG, True)


def install_kv_cache_fix(bridge: TransformerBridge) -> int:
    """Make every attention bridge of ``bridge`` read transformers' ``cache=`` keyword. Idempotent.

    Returns:
        The number of attention layers wrapped (0 for OPT, whose attention never calls ``_update_kv_cache``
        with the cache, and on a second call).
    """
    _quiet_generate(bridge)
    n = 0
    for block in bridge.blocks:
        attn = block.attn
        if hasattr(type(attn), "_update_kv_cache") and not getattr(attn, _FLAG, False) \
                and _reconstructs_attention(attn):
            _wrap(attn)
            n += 1
    return n


def _quiet_generate(bridge: TransformerBridge) -> None:
    """``bridge.generate`` without transformers' ``past_key_values is deprecated`` FutureWarning, which TL's
    generation loop triggers on every step (a user cannot act on it). Other warnings pass. Idempotent."""
    generate = bridge.generate
    if getattr(generate, _FLAG, False):
        return

    @functools.wraps(generate)
    def quiet(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*`past_key_values` is deprecated", category=FutureWarning)
            return generate(*args, **kwargs)

    setattr(quiet, _FLAG, True)
    bridge.generate = quiet


def install_generate_checks(bridge: TransformerBridge) -> bool:
    """Refuse ``bridge.generate(max_new_tokens=...)`` below 1 with a ConfigError naming the fix. Idempotent.

    Returns:
        ``True`` when installed now, ``False`` when it already was.
    """
    import functools

    if getattr(bridge, "_factlens_generate_check", False):
        return False
    original = bridge.generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any):
        n = kwargs.get("max_new_tokens")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            from factlens.errors import ConfigError

            raise ConfigError(f"max_new_tokens={n!r}; generate at least one token (max_new_tokens >= 1). To score "
                              "the prompt without generating, call model(tokens).")
        return original(*args, **kwargs)

    object.__setattr__(bridge, "generate", generate)
    object.__setattr__(bridge, "_factlens_generate_check", True)
    return True


def _reconstructs_attention(attn) -> bool:
    """True for attention bridges that compute attention themselves (and so own the KV-cache update)."""
    from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import (
        JointQKVAttentionBridge,
    )

    return isinstance(attn, JointQKVAttentionBridge)


__all__ = ["install_generate_checks", "install_kv_cache_fix"]
