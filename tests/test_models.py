"""Foundation: model loading/building, tokenizers, and bridge ↔ HF equivalence on both architectures."""

from __future__ import annotations

import pytest
import torch

import factlens
from factlens.models import build_hf, hf_config, resolve
from factlens.tokenizers import gpt2_tokenizer, opt_style_tokenizer


def test_gpt2_tokenizer_offline_ids():
    tok = gpt2_tokenizer()
    expected = {" Paris": 6342, " Tokyo": 11790, " Rome": 10598, " London": 3576, " Beijing": 11618,
                " Canberra": 33452, " Lisbon": 41898, " Bangkok": 35007}
    for text, idx in expected.items():
        assert tok.encode(text) == [idx]
    assert tok("The capital of France is")["input_ids"] == [464, 3139, 286, 4881, 318]
    assert tok.decode([464, 3139, 286, 4881, 318]) == "The capital of France is"


def test_opt_style_tokenizer_prepends_bos():
    tok = opt_style_tokenizer()
    ids = tok(" Paris")["input_ids"]
    assert ids == [tok.bos_token_id, 6342]
    assert tok.bos_token == "</s>" and tok.pad_token == "<pad>"


def test_unknown_model_names_choices():
    with pytest.raises(factlens.UnknownModelError, match="gpt2-medium"):
        factlens.load("gpt5")
    with pytest.raises(factlens.UnknownModelError):
        factlens.tiny("llama")


@pytest.mark.parametrize("name", ["gpt2", "openai-community/gpt2", "GPT2-Medium", "facebook/opt-1.3b", "opt-1.3B"])
def test_resolve_aliases(name):
    assert resolve(name).name in factlens.SUPPORTED


def test_bridge_logits_equal_plain_hf(arch):
    hf = build_hf(arch, seed=3).eval()
    reference = build_hf(arch, seed=3).eval()
    reference.config._attn_implementation = "eager"  # stock HF eager attention as the golden reference
    bridge = factlens.bridge_from_hf(hf)
    tokens = bridge.to_tokens(["The capital of France is", "We confirm that the capital of Spain is"])
    with torch.no_grad():
        expected = reference(tokens).logits
        got_bridge = bridge(tokens)
        got_hf_sdpa = hf(tokens).logits  # the original HF model is untouched by bridge_from_hf (copied)
    torch.testing.assert_close(got_bridge, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_hf_sdpa, expected, atol=1e-5, rtol=0)


def test_tiny_overrides_and_seed():
    a = factlens.tiny("gpt2", seed=1, n_layer=3)
    b = factlens.tiny("gpt2", seed=1, n_layer=3)
    c = factlens.tiny("gpt2", seed=2, n_layer=3)
    assert a.cfg.n_layers == 3
    tokens = a.to_tokens("hello world")
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))
        assert not torch.equal(a(tokens), c(tokens))
    assert factlens.tiny("opt", num_hidden_layers=3).cfg.n_layers == 3


def test_compat_mode_keeps_logits(arch):
    plain = factlens.tiny(arch, seed=4)
    compat = factlens.tiny(arch, seed=4, compat=True)
    tokens = plain.to_tokens("The capital of France is")
    with torch.no_grad():
        torch.testing.assert_close(torch.log_softmax(compat(tokens), -1), torch.log_softmax(plain(tokens), -1),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(factlens.SUPPORTED))
def test_full_size_configs(name):
    spec = resolve(name)
    cfg = hf_config(name, full_size=True)
    layers = cfg.n_layer if spec.family == "gpt2" else cfg.num_hidden_layers
    heads = cfg.n_head if spec.family == "gpt2" else cfg.num_attention_heads
    width = cfg.n_embd if spec.family == "gpt2" else cfg.hidden_size
    assert (layers, heads, width) == (spec.n_layers, spec.n_heads, spec.d_model)
    expected = {"gpt2": (12, 12), "gpt2-medium": (24, 16), "gpt2-large": (36, 20), "opt-1.3b": (24, 32)}[name]
    assert (layers, heads) == expected


@pytest.mark.slow
@pytest.mark.parametrize("name", list(factlens.SUPPORTED))
def test_full_size_bridges_build(name):
    spec = resolve(name)
    bridge = factlens.full_size(name)
    assert (bridge.cfg.n_layers, bridge.cfg.n_heads, bridge.cfg.d_model) == (spec.n_layers, spec.n_heads, spec.d_model)
    tokens = bridge.to_tokens("The capital of France is")
    with torch.no_grad():
        logits = bridge(tokens)
    assert logits.shape[-1] == spec.vocab_size and torch.isfinite(logits).all()


def test_full_size_gpt2_small_builds(gpt2_small_twin):
    bridge = gpt2_small_twin
    assert (bridge.cfg.n_layers, bridge.cfg.n_heads, bridge.cfg.d_model) == (12, 12, 768)


def test_per_head_outputs_sum_to_attn_out(model, tokens):
    _, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"]  # [b, p, h, dh]
        per_head = torch.einsum("bphd,hdm->bphm", z, model.blocks[layer].attn.W_O)
        total = per_head.sum(2) + model.blocks[layer].attn.b_O
        torch.testing.assert_close(total, cache[f"blocks.{layer}.hook_attn_out"], atol=1e-5, rtol=0)


def test_residual_identity(model, tokens):
    _, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        resid = cache[f"blocks.{layer}.hook_resid_pre"] + cache[f"blocks.{layer}.hook_attn_out"]
        resid = resid + cache[f"blocks.{layer}.hook_mlp_out"]
        torch.testing.assert_close(resid, cache[f"blocks.{layer}.hook_resid_post"], atol=1e-5, rtol=0)


def test_prepare_rejects_other_architectures():
    class Fake:
        class original_model:
            class config:
                model_type = "llama"

    with pytest.raises(factlens.UnknownModelError, match="GPT-2 and OPT"):
        factlens.prepare(Fake())


def test_fused_gelu_is_gpt2s_gelu_new():
    """factlens's GPT-2 models run ``gelu_new`` as one kernel; logits equal HF's element-wise version."""
    from transformers import GPT2LMHeadModel
    from transformers.activations import ACT2FN, GELUTanh, NewGELUActivation

    from factlens.models import bridge_from_hf, fuse_activations

    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 4
    assert torch.allclose(GELUTanh()(x), ACT2FN["gelu_new"](x), atol=1e-6)
    cfg = hf_config("gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=300)
    torch.manual_seed(0)
    plain = GPT2LMHeadModel(cfg).eval()  # stock HF: NewGELUActivation
    assert isinstance(plain.transformer.h[0].mlp.act, NewGELUActivation)
    tokens = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = plain(tokens).logits
        bridge = bridge_from_hf(plain, gpt2_tokenizer())  # a copy: the user's model is left as it is
        assert isinstance(plain.transformer.h[0].mlp.act, NewGELUActivation)
        assert isinstance(bridge.original_model.transformer.h[1].mlp.act, GELUTanh)
        assert torch.allclose(bridge(tokens), ref, atol=1e-5)
        assert fuse_activations(plain) == 2 and fuse_activations(plain) == 0  # idempotent
        assert torch.allclose(plain(tokens).logits, ref, atol=1e-5)
    built = build_hf("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    assert isinstance(built.transformer.h[0].mlp.act, GELUTanh)
    assert built.config.activation_function == "gelu_new"  # the saved config stays GPT-2's

