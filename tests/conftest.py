"""Shared fixtures: tiny random-weight GPT-2 and OPT bridges (offline), built once per session."""

from __future__ import annotations

import warnings

import pytest
import torch

import factlens

warnings.filterwarnings("ignore", category=UserWarning, module="transformer_lens")


@pytest.fixture
def unchecked():
    """Switch the test run's jaxtyping/beartype checks off for one test: for tests that pass deliberately wrong
    arguments to see factlens's own error, which is what a user gets (the checks run only under pytest)."""
    import jaxtyping

    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)


@pytest.fixture(scope="session", params=["gpt2", "opt"])
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_models() -> dict:
    return {a: factlens.tiny(a, seed=0) for a in ("gpt2", "opt")}


@pytest.fixture(scope="session")
def gpt2_small_twin():
    """A random-weight GPT-2 small (124M parameters; a few seconds to build): tests must not modify it."""
    return factlens.full_size("gpt2")


@pytest.fixture
def model(tiny_models, arch):
    m = tiny_models[arch]
    m.eval()
    m.reset_hooks()
    return m


@pytest.fixture
def tokens(model) -> torch.Tensor:
    return model.to_tokens(["The capital of France is", "Keep in mind, the capital of Japan is"])
