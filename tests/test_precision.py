"""An fp64 model is fp64 end to end: weight processing, the explicit attention path and the hook paths.

The golden reference is the plain HF model in float64. Any float32 rounding on the way (processing the
weights in float32, a softmax computed in float32 when ``hook_pattern`` is hooked) moves the logits by
~1e-8..1e-7, far above the 1e-12 these tests allow.
"""

from __future__ import annotations

import pytest
import torch

from factlens.inputs import at_least_fp32, compute_dtype
from factlens.models import bridge_from_hf, build_hf

TOL = 1e-12


def _centred(logits: torch.Tensor) -> torch.Tensor:
    """Logits minus their mean over the vocabulary (center_unembed shifts every logit by the same amount)."""
    return logits - logits.mean(-1, keepdim=True)


@pytest.fixture(scope="module", params=[("gpt2", False), ("gpt2", True), ("opt", False), ("opt", True)],
                ids=lambda p: f"{p[0]}-{'compat' if p[1] else 'plain'}")
def twin(request):
    arch, compat = request.param
    hf = build_hf(arch, seed=3, dtype=torch.float64).eval()
    bridge = bridge_from_hf(hf, compat=compat)
    tokens = torch.randint(3, 2000, (3, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = hf(tokens).logits
    return bridge, tokens, reference


def test_weights_stay_fp64(twin):
    bridge, _, _ = twin
    dtypes = {p.dtype for p in bridge.parameters() if p.is_floating_point()}
    assert dtypes == {torch.float64}


def test_unhooked_matches_hf_fp64(twin):
    bridge, tokens, reference = twin
    with torch.no_grad():
        logits = bridge(tokens)
    assert logits.dtype == torch.float64
    assert (_centred(logits) - _centred(reference)).abs().max() < TOL


@pytest.mark.parametrize("hook", ["hook_pattern", "hook_attn_scores", "hook_z", "hook_mlp_out"])
def test_caching_keeps_fp64(twin, hook):
    bridge, tokens, reference = twin
    with torch.no_grad():
        plain = bridge(tokens)
        names = [f"blocks.{layer}.{'' if hook == 'hook_mlp_out' else 'attn.'}{hook}"
                 for layer in range(bridge.cfg.n_layers)]
        logits, cache = bridge.run_with_cache(tokens, names_filter=names)
    assert set(names) <= set(cache.keys()), "every layer's hook fired"
    assert {v.dtype for v in cache.values()} == {torch.float64}
    assert (logits - plain).abs().max() < TOL
    assert (_centred(logits) - _centred(reference)).abs().max() < TOL


def test_in_place_identity_edit_on_pattern_keeps_fp64(twin):
    """An fn(tensor, hook) that edits the pattern in place (here: x1) runs the explicit path, in fp64."""
    bridge, tokens, reference = twin
    seen = []

    def scale(pattern, hook):
        seen.append(pattern.dtype)
        pattern.mul_(1.0)

    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), scale)])
    assert seen == [torch.float64] * bridge.cfg.n_layers
    assert (_centred(logits) - _centred(reference)).abs().max() < TOL


def test_real_edit_is_seen_in_fp64(twin):
    """A pattern edit of size 1e-9 moves the logits: fp32 rounding would swallow or blur it."""
    bridge, tokens, _ = twin
    with torch.no_grad():
        plain = bridge(tokens)

        def nudge(pattern, hook):
            pattern[:, :, -1, 0] += 1e-9
            pattern[:, :, -1, -1] -= 1e-9

        logits = bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", nudge)])
    moved = (logits - plain)[:, -1].abs().max()
    assert 0 < moved < 1e-6
    assert (logits - plain)[:, :-1].abs().max() < TOL, "positions before the edited query are untouched"


def test_compute_dtype_never_rounds_down():
    assert compute_dtype(torch.float16) == compute_dtype(torch.bfloat16) == torch.float32
    assert compute_dtype(torch.float32) == torch.float32
    assert compute_dtype(torch.float64) == torch.float64
    x = torch.tensor([1 + 1e-12], dtype=torch.float64)
    assert at_least_fp32(x).item() == x.item()


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_plain_hf_layer_edit_keeps_fp64(arch):
    """factlens's own edits on a plain HF model (the attention patcher's path) run the explicit softmax in fp64."""
    from factlens.attention import LayerEdit, set_layer_edit

    hf = build_hf(arch, seed=4, dtype=torch.float64).eval()
    tokens = torch.randint(3, 2000, (2, 9), generator=torch.Generator().manual_seed(6))
    attn = [blk.attn for blk in hf.transformer.h] if arch == "gpt2" else [
        layer.self_attn for layer in hf.model.decoder.layers]
    with torch.no_grad():
        plain = hf(tokens).logits
        seen = []
        for module in attn:
            set_layer_edit(module, LayerEdit(pattern_fn=lambda p: seen.append(p.dtype) or p))
        try:
            edited = hf(tokens).logits
        finally:
            for module in attn:
                set_layer_edit(module, None)
    assert seen == [torch.float64] * len(attn)
    assert (edited - plain).abs().max() < TOL
