"""TransformerLens compatibility mode at a fraction of TL's memory peak.

``bridge.enable_compatibility_mode()`` (TL 4.3) folds LayerNorms and centres weights by running
``ProcessWeights.process_weights`` on a state dict of the **whole** model. Each of its steps (``fold_layer_norm``,
``center_unembed``, ``fold_value_biases``) deep-copies the dict while its caller still holds the previous
one, and the model keeps its own weights until the end, so the peak is about 3–4 copies of the weights:
17.4 GiB for OPT-1.3B's 5.3 GB.

:func:`enable_compatibility_mode` gives the same result with TL's own processing functions, applied **part by
part**: the unembedding (with ``ln_final``), the embeddings, then one block at a time. Every part is processed
as a one-block (or zero-block) model with the same TL steps, in the same order, and written back into the
bridge (``ProcessWeights.distribute_weights_to_components``) before the next part starts, which frees that
part's old weights. Each step's input dict is released before the step runs. The processing is separable
this way because every TL step touches either one block's tensors or the embedding/unembedding only, so the
weights come out bit-identical to TL's (``tests/test_compat_load.py``). The peak is the weights plus about
two copies of the unembedding (its largest part): 1.3× the weights for gpt2-medium and OPT-1.3B
(``benchmarks/bench_compat_load.py``, ``docs/performance.md``).

Bridges TL processes differently (offloaded ``device_map``, quantized or meta weights, already processed,
``refactor_factored_attn_matrices``) go to TL's own ``enable_compatibility_mode`` unchanged.

Example:
    >>> import torch, factlens
    >>> from factlens.compat import enable_compatibility_mode
    >>> model = factlens.tiny("gpt2", compat=False)
    >>> enable_compatibility_mode(model)
    'parts'
    >>> bool(torch.all(model.blocks[0].ln1.weight == 1))       # LayerNorm weights folded into W_Q/W_K/W_V
    True
"""

from __future__ import annotations

import copy
import ctypes
import logging
import re
import warnings
from typing import TYPE_CHECKING

import torch

from factlens.inputs import compute_dtype

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.*)$")
_LIBC: ctypes.CDLL | bool | None = None


def enable_compatibility_mode(bridge: TransformerBridge, *, disable_warnings: bool = False, fold_ln: bool = True,
                              center_writing_weights: bool = True, center_unembed: bool = True,
                              fold_value_biases: bool = True, refactor_factored_attn_matrices: bool = False,
                              low_memory: bool = True) -> str:
    """TL's ``bridge.enable_compatibility_mode(...)`` (same arguments), processing the weights part by part.

    Args:
        bridge: A TransformerLens 4.3 bridge whose weights have not been processed yet.
        low_memory: False runs TL's own ``enable_compatibility_mode`` (the reference this is tested against).

    Returns:
        ``"parts"`` (processed part by part) or ``"tl"`` (handed to TL's own method).
    """
    flags = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
                 fold_value_biases=fold_value_biases)
    if not low_memory or refactor_factored_attn_matrices or not _separable(bridge):
        bridge.enable_compatibility_mode(disable_warnings=disable_warnings,
                                         refactor_factored_attn_matrices=refactor_factored_attn_matrices, **flags)
        return "tl"
    # TL's own method without processing: its checks, compatibility flags and hook aliases
    bridge.enable_compatibility_mode(disable_warnings=disable_warnings, no_processing=True)
    bridge.clear_hook_registry()
    try:
        bridge._weights_processed = True  # as TL: a partial attempt no longer holds the raw HF basis
        _process_in_parts(bridge, **flags)
    finally:  # as TL: re-initialise hooks even on failure so the bridge stays usable
        bridge._initialize_hook_registry()
        bridge._setup_hook_compatibility()
        bridge._register_all_aliases_recursive()
    return "parts"


def _separable(bridge) -> bool:
    """Whether the bridge is one :func:`_process_in_parts` handles exactly like TL (else TL does it)."""
    if getattr(bridge, "_weights_processed", False) or not hasattr(bridge, "blocks"):
        return False
    if not getattr(bridge.adapter, "supports_compatibility_mode", True):
        return False
    device_map = getattr(bridge.original_model, "hf_device_map", None)
    if device_map and any(str(v).lower() in ("cpu", "disk") for v in device_map.values()):
        return False
    for name in ("encoder_blocks", "decoder_blocks", "vision_encoder"):
        if getattr(bridge, name, None) is not None:
            return False
    if getattr(bridge.cfg, "num_experts", None) or getattr(bridge.cfg, "is_audio_model", False):
        return False
    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter

    if type(bridge.adapter).preprocess_weights is not ArchitectureAdapter.preprocess_weights:
        return False  # an adapter-specific pre-pass over the whole dict (GPT-2 and OPT have none)
    keys = set(bridge.state_dict())
    if not {"embed.weight", "unembed.weight"} <= keys:
        return False
    return all(p.is_floating_point() and p.device.type != "meta" for p in bridge.original_model.parameters())


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so the next part reuses them.

    After a large ``free`` glibc raises its mmap threshold (up to 32 MiB), so the next parts' tensors come from
    the heap, and pages freed there stay in the process unless trimmed. Elsewhere this does nothing.
    """
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  (not glibc: AttributeError)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _normalize_keys(bridge, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-prefixed keys → TL keys, as ``TransformerBridge.process_weights`` does before distributing."""
    prefixes = {remote: tl for tl, (remote, _c) in bridge.real_components.items() if remote and remote != tl}
    out = {}
    for key, value in state_dict.items():
        for remote, tl in prefixes.items():
            if key.startswith(remote + "."):
                key = f"{tl}.{key[len(remote) + 1:]}"
                break
        out[key] = value
    return out


def _pipeline(box: list[dict[str, torch.Tensor]], cfg, adapter, *, fold_ln: bool, center_writing_weights: bool,
              center_unembed: bool, fold_value_biases: bool) -> dict[str, torch.Tensor]:
    """``ProcessWeights.process_weights`` (TL 4.3), step for step, on the dict in ``box``.

    The same steps under the same conditions; the only difference is that every step gets its input straight
    from ``box`` so no reference to the previous dict survives while the step copies it.
    """
    from transformer_lens.weight_processing import ProcessWeights as PW

    state_dict = box.pop()
    original_dtypes: dict[str, torch.dtype] = {}
    original_keys = set(state_dict)
    for k, v in state_dict.items():  # fp16/bf16 are processed in float32; float64 stays float64
        if isinstance(v, torch.Tensor) and v.is_floating_point() and compute_dtype(v.dtype) != v.dtype:
            original_dtypes[k] = v.dtype
            state_dict[k] = v.float()
    box.append(state_dict)
    del state_dict
    if fold_ln and adapter and not getattr(adapter, "supports_fold_ln", True):
        warnings.warn(f"{type(adapter).__name__} does not support fold_ln; norm weights stay unfolded and "
                      "analyses assuming folded LN will be off.", UserWarning, stacklevel=3)
        fold_ln = False
    norm = getattr(cfg, "normalization_type", "LN")
    if fold_ln:
        if norm in ("LN", "LNPre"):
            box.append(PW.fold_layer_norm(box.pop(), cfg, fold_biases=True, center_weights=True, adapter=adapter))
        elif norm in ("RMS", "RMSPre"):
            box.append(PW.fold_layer_norm(box.pop(), cfg, fold_biases=False, center_weights=False, adapter=adapter))
    if center_writing_weights and adapter and not getattr(adapter, "supports_center_writing_weights", True):
        warnings.warn(f"{type(adapter).__name__} does not support center_writing_weights; writing weights stay "
                      "uncentered.", UserWarning, stacklevel=3)
        center_writing_weights = False
    centre = center_writing_weights and norm in ("LN", "LNPre") and not getattr(cfg, "final_rms", False)
    if centre:
        box.append(PW.center_writing_weights(box.pop(), cfg, adapter=adapter))
    if center_unembed:
        box.append(PW.center_unembed(box.pop(), cfg=cfg, adapter=adapter))
    if fold_value_biases:
        box.append(PW.fold_value_biases(box.pop(), cfg, adapter=adapter))
        if centre:
            state_dict = box[-1]
            for layer in range(cfg.n_layers):
                key = PW._get_param_key(f"blocks.{layer}.attn.b_O", adapter)
                if key in state_dict:
                    b_O = PW.convert_tensor_to_tl_format(key, state_dict, state_dict.get(key), cfg, adapter, layer)
                    state_dict[key] = PW.convert_tensor_to_hf_format(key, b_O - b_O.mean(), cfg, adapter, layer)
            del state_dict
    state_dict = box.pop()
    for k in state_dict.keys() - original_keys:  # biases created by folding take their weight's dtype
        weight = k.removesuffix(".bias") + ".weight"
        weight_dtype = original_dtypes.get(weight, getattr(state_dict.get(weight), "dtype", None))
        if weight_dtype is not None:
            original_dtypes[k] = weight_dtype
    for k, dtype in original_dtypes.items():
        if k in state_dict and isinstance(state_dict[k], torch.Tensor):
            state_dict[k] = state_dict[k].to(dtype)
    return state_dict


def _process_in_parts(bridge, *, fold_ln: bool, center_writing_weights: bool, center_unembed: bool,
                      fold_value_biases: bool) -> None:
    """Process and write back the unembedding, the embeddings, then each block, one part at a time."""
    from transformer_lens.utilities.activation_functions import softcap_enabled
    from transformer_lens.weight_processing import ProcessWeights as PW

    cfg, adapter = bridge.cfg, bridge.adapter
    if center_unembed and softcap_enabled(getattr(cfg, "output_logits_soft_cap", None)):
        logging.warning("center_unembed=True is incompatible with logit softcapping; disabling center_unembed.")
        center_unembed = False
    flags = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights, fold_value_biases=fold_value_biases)
    blocks: list[dict[str, torch.Tensor]] = [{} for _ in range(cfg.n_layers)]
    embeds: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in bridge.state_dict().items():  # references to the live weights, no copies
        m = _BLOCK_KEY.match(key)
        if m:
            blocks[int(m.group(1))][f"blocks.0.{m.group(2)}"] = value
        elif key.startswith(("embed.", "pos_embed.")):
            embeds[key] = value
        else:
            rest[key] = value
    del key, value
    like = embeds["embed.weight"]
    d, dtype, device = cfg.d_model, like.dtype, like.device
    del like

    def stand_ins() -> dict[str, torch.Tensor]:
        # center_writing_weights needs embedding keys; [1, d] stand-ins are processed and dropped
        return {"embed.weight": torch.zeros(1, d, dtype=dtype, device=device),
                "pos_embed.weight": torch.zeros(1, d, dtype=dtype, device=device)}

    def write_back(processed: dict[str, torch.Tensor], rename) -> None:
        processed = {rename(k): v for k, v in _normalize_keys(bridge, processed).items() if rename(k)}
        PW.distribute_weights_to_components(processed, bridge.real_components)
        del processed
        _release_freed_memory()

    none, one = copy.copy(cfg), copy.copy(cfg)
    none.n_layers, one.n_layers = 0, 1
    # 1. unembedding + ln_final (fold ln_final, centre W_U/b_U): a zero-block model
    box = [{**rest, **stand_ins()}]
    rest.clear()
    write_back(_pipeline(box, none, adapter, center_unembed=center_unembed, **flags),
               lambda k: None if k.startswith(("embed.", "pos_embed.")) else k)
    # 2. embeddings (centre W_E/W_pos)
    box = [dict(embeds)]
    embeds.clear()
    write_back(_pipeline(box, none, adapter, center_unembed=False, **flags), lambda k: k)
    # 3. each block as a one-block model (fold ln1/ln2, centre W_O/b_O/W_out/b_out, fold b_V into b_O)
    for layer in range(cfg.n_layers):
        box = [{**blocks[layer], **stand_ins()}]
        blocks[layer] = {}
        write_back(_pipeline(box, one, adapter, center_unembed=False, **flags),
                   lambda k, layer=layer: f"blocks.{layer}.{k[9:]}" if k.startswith("blocks.0.") else None)
    if fold_ln:
        bridge._fold_layer_norms_into_batched_experts()
    if adapter is not None:
        adapter.postprocess_weights(bridge)


__all__ = ["enable_compatibility_mode"]
