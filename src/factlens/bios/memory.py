"""How much memory a biography training run needs, measured once before its first step.

The activations autograd saves for backward are measured, not modelled: :func:`saved_bytes` runs the training
forward and loss on a batch of 1 and of 2 sequences while :func:`factlens.resources.saved_tensor_bytes` counts
every saved tensor (each storage once, parameters excluded), and :func:`estimate` extrapolates the count
linearly to the rank's batch (every saved tensor is per-sequence or fixed; on GPT-2 and OPT this over-predicts a
direct measurement by under 0.05%). Weights, gradients, AdamW state and logits are fp32 upper bounds.
:func:`check` refuses, with :class:`~factlens.errors.ResourceError` and the fixes, a run that would not fit.

The trainer calls this once, at start-up; nothing here runs on the step path.

Example:
    >>> import torch, factlens
    >>> from factlens.bios.memory import saved_bytes
    >>> model = factlens.build_hf("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8)
    >>> loss = lambda tokens: model(tokens).logits.sum()
    >>> one, two = saved_bytes(model, loss, seq_len=8, device=torch.device("cpu"))
    >>> 0 < one < two
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from factlens.resources import check_fits, format_bytes, saved_tensor_bytes


def saved_bytes(model: torch.nn.Module, loss: Callable[[torch.Tensor], torch.Tensor], *, seq_len: int,
                device: torch.device, batches: tuple[int, ...] = (1, 2)) -> tuple[int, ...]:
    """Bytes ``loss(tokens)`` saves for backward on ``b`` all-zero sequences, for each ``b`` in ``batches``.

    The model runs in training mode (dropout masks are saved too) with the RNG forked, so the caller's
    randomness and the model's mode are untouched.
    """
    was_training = model.training
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.train()
        try:
            for batch in batches:
                tokens = torch.zeros(batch, seq_len, dtype=torch.long, device=device)  # [b, p]
                out.append(saved_tensor_bytes(lambda t=tokens: loss(t), exclude=model.parameters()))
        finally:
            model.train(was_training)
    return tuple(out)


def estimate(model: torch.nn.Module, saved: tuple[int, int], *, batch: int, seq_len: int, vocab_size: int,
             patched_layers: int | None = None) -> dict[str, int]:
    """Bytes one rank needs for ``batch`` sequences, by part (``saved``: :func:`saved_bytes` at batch 1, 2).

    ``patched_layers``: the number of layers whose attention is patched from a reference model (which then
    lives on the device too, with its captured patterns), or ``None`` for an unpatched run.
    """
    n_params = sum(p.numel() for p in model.parameters())
    one, two = saved
    est = {"weights + gradients + AdamW": 16 * n_params,
           "activations saved for backward": one + (two - one) * (batch - 1),
           # the logits, their flattened copy and two gradients live at once at the start of backward
           "logits (copies and gradients in the loss)": 4 * 4 * batch * seq_len * vocab_size}
    if patched_layers is not None:
        est["reference model"] = 4 * n_params
        est["reference patterns"] = 4 * batch * patched_layers * model.config.num_attention_heads * seq_len ** 2
    return est


def check(est: dict[str, int], device: torch.device, *, patched: bool) -> None:
    """Refuse (:class:`~factlens.errors.ResourceError`, naming the fixes) a run whose estimate does not fit."""
    parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in est.items())
    fixes = ["a smaller batch_size", "a smaller model (TrainConfig.model)"]
    if patched:
        fixes.insert(1, "patch fewer layers (PatchConfig.layers)")
    if device.type == "cuda":
        fixes.append("more GPUs (torchrun splits the batch across ranks)")
    check_fits(sum(est.values()), device, what=f"training ({parts})", fixes=fixes)


__all__ = ["check", "estimate", "saved_bytes"]
