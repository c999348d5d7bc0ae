"""Doctest namespace: the names factlens's function-level docstring examples assume (as their module examples
set them up): a tiny GPT-2 ``model``, ``tokens``, a capital-task dataset ``ds``/``dataset`` and an
``intercept``. Docstring examples run with the test suite (``--doctest-modules``)."""

from __future__ import annotations

import warnings

import pytest

warnings.filterwarnings("ignore", category=UserWarning, module="transformer_lens")


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    import torch

    import factlens
    from factlens import capitals

    if "model" not in doctest_namespace:
        model = factlens.tiny("gpt2", compat=True)
        ds = capitals.dataset_for(model)  # the 225 zero-shot prompts
        doctest_namespace.update(
            factlens=factlens, torch=torch, capitals=capitals, model=model, ds=ds, dataset=ds,
            tokens=model.to_tokens("The capital of France is"),
            intercept=torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)))
        doctest_namespace["c"] = doctest_namespace["intercept"]
    doctest_namespace["model"].eval().reset_hooks()
