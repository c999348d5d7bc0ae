"""factlens.inputs: devices, dtypes and head counts are checked when a model is built; token ids and lengths
before every forward pass of a prepared bridge (issue 14 §10)."""

from __future__ import annotations

import pytest
import torch

import factlens
from factlens.errors import ConfigError, ShapeError
from factlens.inputs import DTYPES, check_device, check_tokens, resolve_dtype


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_dtype_names_match_torch(name):
    dtype = resolve_dtype(name)
    assert dtype == DTYPES[name] and dtype.is_floating_point
    assert resolve_dtype(f"torch.{name}" if hasattr(torch, name) else name) == dtype
    assert resolve_dtype(dtype) is dtype


def test_build_hf_takes_a_dtype_name():
    hf = factlens.build_hf("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=50, dtype="bf16")
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    with pytest.raises(ConfigError, match="'fp16'"):
        factlens.build_hf("gpt2", dtype="float8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "gpu", "cdua", "npu"])
def test_devices_are_refused_when_the_model_is_built(device):
    for build in (lambda: factlens.tiny("gpt2", device=device), lambda: factlens.load("gpt2", device=device),
                  lambda: factlens.full_size("gpt2", device=device)):
        with pytest.raises(ConfigError, match="'cpu'"):
            build()  # before any weights are loaded or built (load needs no hub to fail here)
    assert check_device("cpu") == torch.device("cpu") and check_device(None) is None


@pytest.mark.parametrize("arch,overrides", [("gpt2", {"n_head": 3}), ("opt", {"num_attention_heads": 5}),
                                            ("gpt2", {"n_layer": 0}), ("opt", {"num_attention_heads": 0})])
def test_head_counts_must_divide_the_width(arch, overrides):
    with pytest.raises(ConfigError, match=r"pick|at least one layer|positive"):
        factlens.build_hf(arch, **overrides)


def test_check_tokens_boundaries():
    check_tokens(torch.tensor([[0, 49]]), vocab_size=50, n_ctx=2)  # the largest valid id, the full context
    check_tokens(torch.tensor([[7]]), vocab_size=50, n_ctx=4, past=3)  # the last position, via the KV cache
    for ids, past in ((torch.tensor([[50]]), 0), (torch.tensor([[-1]]), 0), (torch.tensor([[1, 2, 3]]), 0),
                      (torch.tensor([[1]]), 2)):
        with pytest.raises(ShapeError):
            check_tokens(ids, vocab_size=50, n_ctx=2, past=past)


def test_prepared_bridges_check_every_forward(model):
    n_ctx, vocab = model.cfg.n_ctx, model.cfg.d_vocab
    ok = torch.randint(0, vocab, (2, n_ctx))
    assert model(ok).shape == (2, n_ctx, vocab)  # the whole context is fine
    with pytest.raises(ShapeError, match="vocabulary"):
        model(torch.tensor([[1, vocab]]))
    with pytest.raises(ShapeError, match="context"):
        model(torch.zeros(1, n_ctx + 1, dtype=torch.long))
    with pytest.raises(ShapeError, match="context"):
        model.run_with_cache(torch.zeros(1, n_ctx + 1, dtype=torch.long))
    assert factlens.prepare(model) is model  # idempotent: still one check
    assert len(model.original_model._forward_pre_hooks) == 1
