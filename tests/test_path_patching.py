"""Batched path patching equals the literal official procedure (tests/reference_recall.py), on tiny GPT-2 and OPT."""

from __future__ import annotations

import pytest
import torch

import factlens
from factlens.recall import dataset_for, metric, path_patch, path_patch_hooks, run_at_end
from reference_recall import path_patch_reference, tl_sweep


@pytest.fixture(scope="module", params=["gpt2", "opt"])
def model(request):
    return factlens.tiny(request.param)


@pytest.fixture(scope="module")
def ds(model):
    return dataset_for(model, n=12, seed=3)


def _close(a, b, rtol=1e-4):
    scale = max(float(b.abs().max()), 1e-12)
    return float((a - b).abs().max()) <= rtol * scale


@pytest.fixture(scope="module")
def references(model, ds):
    return {fm: path_patch_reference(model, ds, metric="iw", freeze_mlps=fm) for fm in (False, True)}


@pytest.mark.parametrize("freeze_mlps", [False, True])
def test_batched_equals_reference(model, ds, references, freeze_mlps):
    # max_batch=7 makes chunks straddle senders (12 prompts per sender) and layers
    fast = path_patch(model, ds, metric="iw", freeze_mlps=freeze_mlps, max_batch=7, progress=False)
    ref = references[freeze_mlps]
    assert fast.clean == pytest.approx(ref.clean, rel=1e-5)
    assert _close(fast.patched_heads, ref.patched_heads)
    assert _close(fast.patched_mlp, ref.patched_mlp)
    assert _close(fast.values, ref.values, rtol=1e-3)
    # the patch does something: some sender moves the metric
    assert float((ref.patched_heads - ref.clean).abs().max()) > 1e-6


def test_batched_equals_transformer_lens_generic_activation_patch(model, ds):
    """The golden reference of TransformerLens itself: generic_activation_patch over every head's hook_z and every
    hook_mlp_out, with q/k/v frozen by persistent hooks (the patched metric, before the % change)."""
    cf = ds.counterfactual(0)
    fast = path_patch(model, ds, cf, metric="iw", max_batch=50, progress=False)
    heads, mlps = tl_sweep(model, ds, cf, progress=False)
    assert _close(fast.patched_heads, heads)
    assert _close(fast.patched_mlp, mlps)
    assert float((heads - fast.clean).abs().max()) > 1e-6  # the sweep moves the metric


def test_batched_equals_reference_compat_and_prob_metric():
    model = factlens.tiny("gpt2", compat=True, seed=1)
    ds = dataset_for(model, n=6, seed=1)
    ref = path_patch_reference(model, ds, metric="prob")
    fast = path_patch(model, ds, metric="prob", max_batch=1000, progress=False)
    assert _close(fast.patched_heads, ref.patched_heads)
    assert _close(fast.patched_mlp, ref.patched_mlp)


@pytest.mark.parametrize("kind", ["iw-n", "logprob", "n", "logit"])
def test_callable_metric_matches_string(model, ds, kind):
    # the string kinds take path patching's column shortcut (linear kinds) or its logits; the callable gets the
    # whole [n, vocab] logits: one definition of each kind (recall.metrics.kind_values) serves both
    a = path_patch(model, ds, metric=kind, max_batch=64, progress=False)
    b = path_patch(model, ds, metric=metric(ds, kind, reduce="none"), max_batch=64, progress=False)
    assert torch.allclose(a.patched_heads, b.patched_heads, rtol=1e-4, atol=1e-6)
    assert torch.allclose(a.patched_mlp, b.patched_mlp, rtol=1e-4, atol=1e-6)
    assert a.clean == pytest.approx(b.clean, rel=1e-6)


def test_a_run_whose_mlps_the_recomputation_cannot_reproduce_is_refused(model, ds):
    """Pass C recomputes the MLPs from resid_mid; a clean run whose MLP outputs were edited would make every
    number wrong, so path_patch checks the recomputation against the run and refuses it."""
    last = model.cfg.n_layers - 1
    iv = factlens.hook(f"blocks.{last}.hook_mlp_out", lambda t, hook: 2 * t, "double the last MLP")
    run = run_at_end(model, ds, path_patch_hooks(model), interventions=[iv])
    with pytest.raises(factlens.ConfigError, match="does not reproduce"):
        path_patch(model, ds, run=run, progress=False)


def test_self_counterfactual_single_prompt_is_zero(model, ds):
    one = ds.select([0])  # D_new == D_orig with one prompt: the mean is the clean value itself
    res = path_patch(model, one, counterfactual=one, max_batch=5, progress=False)
    assert float(res.values.abs().max()) < 1e-3
    assert float(res.mlp.abs().max()) < 1e-3


def test_train_mode_raises(model, ds):
    model.train()
    try:
        with pytest.raises(factlens.ModeError, match="eval"):
            path_patch(model, ds, progress=False)
    finally:
        model.eval()


def test_result_api(model, ds):
    res = path_patch(model, ds, progress=False)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    df = res.to_dataframe()
    assert len(df) == L * H + L and set(df["component"]) == {"head", "mlp"}
    top = res.top(3)
    assert list(top["pct_change"].abs()) == sorted(df["pct_change"].abs(), reverse=True)[:3]
    neg = res.top(2, by="neg", component="head")
    assert (neg["component"] == "head").all() and neg["pct_change"].iloc[0] == df[df.component == "head"]["pct_change"].min()
    fig = res.plot()
    heat = fig.data[0]
    assert len(heat.x) == H + 1 and heat.x[-1] == "MLP" and heat.zmid == 0
    row = df[(df["layer"] == 1) & (df["head"] == 2)].iloc[0]
    assert row["pct_change"] == pytest.approx(100 * (row["patched"] - res.clean) / res.clean)
