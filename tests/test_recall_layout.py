"""The layout of factlens.recall: declared hooks, one shared pass, names that say what they hold.

Each recall analysis declares the hooks it reads; analyze's shared pass is their union and serves them all.

An analysis given a run restricted to its declared hooks must work (so it reads nothing it did not declare), one
missing any declared hook must be refused (so the declaration is not wider than needed in a silent way), and a
run of other prompts must be refused, never silently replaced by a pass of its own.
"""

from __future__ import annotations

import importlib
import pkgutil
import types

import pytest
import torch

import factlens
from factlens.recall import (
    capture_mlp_activations,
    dataset_for,
    final_layer_effect,
    final_layer_hooks,
    logit_lens,
    logit_lens_hooks,
    mitigation_hooks,
    mitigation_table,
    mlp_activation_hooks,
    mover_hooks,
    mover_scores,
    path_patch,
    path_patch_hooks,
    run_at_end,
    shared_hooks,
)
from factlens.recall.final_layer import split_from_run


@pytest.fixture(scope="module", params=["gpt2", "opt"])
def model(request):
    return factlens.tiny(request.param, compat=True)


@pytest.fixture(scope="module")
def ds(model):
    return dataset_for(model, n=30, seed=1)


def _analyses(model):
    """name -> (declared hooks, needs logits, the analysis on a given run)."""
    last = model.cfg.n_layers - 1
    return {
        "logit_lens": (logit_lens_hooks(model), True, lambda ds, run: logit_lens(model, ds, run=run)),
        "path_patch": (path_patch_hooks(model), True,
                       lambda ds, run: path_patch(model, ds, run=run, max_batch=256, progress=False)),
        "movers": (mover_hooks(model), False, lambda ds, run: mover_scores(model, ds, run=run)),
        "mlp_activations": (mlp_activation_hooks(model, 0), False,
                            lambda ds, run: capture_mlp_activations(model, ds, 0, run=run)),
        "final_layer_effect": (final_layer_hooks(model), True, lambda ds, run: final_layer_effect(model, ds, run=run)),
        "final_layer_split": (final_layer_hooks(model, neurons=True), True,
                              lambda ds, run: split_from_run(model, ds, run, neurons=True)),
        "mitigation_table": (mitigation_hooks(model), True,
                             lambda ds, run: mitigation_table(model, shots=[0], folds=3, n=len(ds), seed=1,
                                                              runs={0: run}, progress=False)),
        "last_mlp_activations": (mlp_activation_hooks(model, last, [(0, 1), (last, 0)]), False,
                                 lambda ds, run: capture_mlp_activations(model, ds, last, [(0, 1), (last, 0)],
                                                                         run=run)),
    }


def test_every_declared_hook_is_in_the_shared_pass(model):
    shared = set(shared_hooks(model))
    for name, (hooks, _, _) in _analyses(model).items():
        if name == "final_layer_split":  # neurons=True reads the last MLP's neurons, which analyze does not ask
            hooks = [h for h in hooks if not h.endswith("mlp.hook_post")]
        assert set(hooks) <= shared, (name, sorted(set(hooks) - shared))
    assert len(shared_hooks(model)) == len(shared)  # no name twice


@pytest.mark.parametrize("name", ["logit_lens", "path_patch", "movers", "mlp_activations", "final_layer_effect",
                                  "final_layer_split", "mitigation_table", "last_mlp_activations"])
def test_an_analysis_reads_exactly_what_it_declares(model, ds, name, monkeypatch):
    hooks, logits, analysis = _analyses(model)[name]
    run = run_at_end(model, ds, hooks, logits=logits)
    # no pass of its own on the clean prompts: every forward it may run is counted and checked
    from factlens.recall import forward

    calls = []
    real = forward.run_at_end

    def counting(model_, dataset, names=(), **kw):
        calls.append((len(dataset), kw.get("interventions") is not None, kw.get("desc")))
        return real(model_, dataset, names, **kw)

    for module in ("factlens.recall.forward", "factlens.recall.path_patching", "factlens.recall.mitigation",
                   "factlens.recall.mlp_decomposition"):
        monkeypatch.setattr(f"{module}.run_at_end", counting, raising=False)
    analysis(ds, run)  # reads only the declared hooks: EndRun raises ConfigError on any other
    clean_passes = [c for c in calls if not c[1] and "pass A" not in str(c[2])]
    assert clean_passes == [], clean_passes
    # and every declared hook is needed: drop one and the analysis refuses the run, naming the hook
    dropped = hooks[len(hooks) // 2]
    partial = run_at_end(model, ds, [h for h in hooks if h != dropped], logits=logits)
    with pytest.raises(factlens.ConfigError, match=dropped.replace(".", r"\.")):
        analysis(ds, partial)


def test_a_run_of_other_prompts_is_refused(model, ds):
    other = dataset_for(model, n=30, seed=2)
    run = run_at_end(model, other, logit_lens_hooks(model))
    assert not torch.equal(other.tokens, ds.tokens)
    with pytest.raises(factlens.ConfigError, match="other prompts"):
        logit_lens(model, ds, run=run)
    with pytest.raises(factlens.ConfigError, match="other prompts"):
        logit_lens(model, ds.select(range(10)), run=run)


def test_no_attribute_shadows_its_own_module():
    """``import factlens.recall.x`` and ``factlens.recall.x`` are the same module for every submodule x."""
    import factlens.recall as recall

    for info in pkgutil.iter_modules(recall.__path__):
        module = importlib.import_module(f"factlens.recall.{info.name}")
        assert getattr(recall, info.name) is module, f"factlens.recall.{info.name} is not its module"
    assert isinstance(factlens.mitigate, types.FunctionType)  # the function, from factlens.recall.mitigation
    assert importlib.import_module("factlens.recall.mitigation").mitigate is factlens.mitigate


def test_capitals_is_a_thin_entry_that_points_to_recall():
    from factlens import capitals

    assert capitals.__all__ == ["analyze", "dataset", "mitigation_table"]
    with pytest.raises(AttributeError, match=r"from factlens\.recall import path_patch"):
        capitals.path_patch  # noqa: B018
    model = factlens.tiny("gpt2")
    ds = capitals.dataset(model, appendix=True, n=6)
    assert all("capital is" in p for p in ds.prompts)
    assert torch.equal(capitals.dataset(model, n=6).tokens, dataset_for(model, n=6).tokens)
