"""KV-cache generation on factlens-prepared bridges: cached, uncached and a hand-written greedy loop agree.

transformers 5.2x hands the cache to attention as ``cache=``; TransformerLens 4.3's GPT-2 attention bridge read
only ``past_key_values``, so every cached GPT-2 decoding step attended to the new token alone
(:mod:`factlens.generation`). These tests fail on a stock bridge.
"""

from __future__ import annotations

import pytest
import torch

import factlens
from factlens.generation import install_kv_cache_fix

PROMPTS = ["The capital of France is", "Keep in mind, the capital of Japan is"]
STEPS = 6


def greedy_by_hand(model, tokens: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with full forward passes only (no cache): the golden reference."""
    out = tokens
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(out)[:, -1].argmax(-1, keepdim=True)  # [b, 1]
            out = torch.cat([out, nxt], dim=1)
    return out


def generate(model, tokens, cached: bool) -> torch.Tensor:
    return model.generate(tokens, max_new_tokens=STEPS, do_sample=False, use_past_kv_cache=cached, verbose=False)


@pytest.fixture(scope="module")
def varied():
    """Tiny twins with larger random weights, so greedy decoding does not just repeat one token."""
    models = {}
    for arch in ("gpt2", "opt"):
        m = factlens.tiny(arch, seed=3)
        with torch.no_grad():
            for p in m.original_model.parameters():
                if p.ndim == 2:
                    p.mul_(4.0)
        models[arch] = m
    return models


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_cached_generation_equals_uncached_and_greedy_by_hand(varied, arch):
    model = varied[arch]
    tokens = model.to_tokens(PROMPTS[1])
    cached, plain = generate(model, tokens, True), generate(model, tokens, False)
    golden = greedy_by_hand(model, tokens, STEPS)
    assert torch.equal(plain, golden)
    assert torch.equal(cached, golden), f"{arch}: cached generation differs from full forward passes"
    assert len(set(golden[0, tokens.shape[1]:].tolist())) > 1, "the test needs a non-degenerate continuation"


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
@pytest.mark.parametrize("attention,intercept", [(True, False), (True, True)])
def test_mitigated_generation_with_cache(varied, arch, attention, intercept):
    """Under factlens.mitigate the edits apply at each decoding step's new token (position -1 of a 1-token
    query) exactly as they do at the last position of a full forward pass."""
    model = varied[arch]
    tokens = model.to_tokens(PROMPTS[0])
    c = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)) if intercept else None
    with factlens.mitigate(model, intercept=c, attention=attention) as run:
        cached = generate(model, tokens, True)
    assert all(r.calls == STEPS for r in run.records.values())  # one call per generated token
    with factlens.mitigate(model, intercept=c, attention=attention):
        plain = generate(model, tokens, False)
    with factlens.mitigate(model, intercept=c, attention=attention):
        golden = greedy_by_hand(model, tokens, STEPS)
    assert torch.equal(plain, golden)
    assert torch.equal(cached, golden)
    assert not torch.equal(golden, greedy_by_hand(model, tokens, STEPS)), "the mitigation must change the tokens"


def test_kv_fix_is_idempotent_and_only_for_gpt2(tiny_models):
    assert install_kv_cache_fix(tiny_models["gpt2"]) == 0  # prepare already installed it
    assert install_kv_cache_fix(tiny_models["opt"]) == 0   # OPT's HF attention updates the cache itself
    assert all(getattr(b.attn, "_factlens_kv_cache_fix", False) for b in tiny_models["gpt2"].blocks)


def test_generation_past_the_context_is_refused(tiny_models):
    model = tiny_models["gpt2"]
    tokens = model.to_tokens(PROMPTS[0])
    with pytest.raises(factlens.ShapeError, match="max_new_tokens"):
        model.generate(tokens, max_new_tokens=model.cfg.n_ctx, do_sample=False, verbose=False)


def test_mitigation_vectors_of_another_dtype_apply_during_generation(varied):
    """An intercept in float64 (e.g. fitted in double precision) is cast to the model's dtype at every step."""
    model = varied["gpt2"]
    tokens = model.to_tokens(PROMPTS[0])
    c = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    outs = []
    for vec in (c, c.double()):
        with factlens.mitigate(model, intercept=vec, attention=False):
            outs.append(generate(model, tokens, True))
    assert torch.equal(outs[0], outs[1])
