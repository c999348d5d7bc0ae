"""Final-layer mitigations (Lv et al. §6): identities, locality, equivalences and the out-of-fold table."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import factlens
from factlens.recall import (
    analyze,
    check_intercept,
    dataset_for,
    final_layer_effect,
    fit_intercept,
    mitigate,
    mitigation_table,
    template_folds,
    unembed_params,
)


@pytest.fixture(scope="module", params=["gpt2", "opt"])
def model(request):
    return factlens.tiny(request.param)


@pytest.fixture(scope="module")
def tokens(model):
    ds = dataset_for(model, n=6, seed=2)
    same = ds.end == ds.end[0]  # equal-length prompts, so position -1 is every prompt's end
    return ds.tokens[same][:, : int(ds.end[0]) + 1]


def _logits(model, tokens, fwd_hooks=()):
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))


def test_identities(model, tokens):
    clean = _logits(model, tokens)
    with torch.no_grad(), mitigate(model, attention=True, heads=[]):
        a = model(tokens)
    with torch.no_grad(), mitigate(model, intercept=torch.zeros(model.cfg.d_model), attention=False):
        b = model(tokens)
    assert torch.equal(a, clean) and torch.equal(b, clean)


def test_attention_fix_is_local_to_last_position_and_layer(model, tokens):
    L = model.cfg.n_layers
    name = f"blocks.{L - 1}.hook_resid_pre"
    with torch.no_grad():
        clean, cache = model.run_with_cache(tokens, names_filter=name)
    seen = {}
    with torch.no_grad(), mitigate(model, attention=True, positions=-1) as run:
        _, edited = model.run_with_cache(tokens, names_filter=name)
        logits = model(tokens)
    seen.update(run.records)
    assert torch.equal(edited[name], cache[name])  # nothing before the last layer changed
    assert torch.allclose(logits[:, :-1], clean[:, :-1], atol=1e-6)  # earlier positions unchanged
    assert float((logits[:, -1] - clean[:, -1]).abs().max()) > 1e-4  # the last one changed
    assert seen[f"blocks.{L - 1}.attn.hook_attn_scores"].calls == 2


def test_intercept_removal_equals_residual_edit(model, tokens):
    L = model.cfg.n_layers
    c = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))

    def minus_c(t, hook):
        t = t.clone()
        t[:, -1] -= 0.5 * c
        return t

    ref = _logits(model, tokens, [(f"blocks.{L - 1}.hook_resid_post", minus_c)])
    with torch.no_grad(), mitigate(model, intercept=c, attention=False, coeff=0.5):
        out = model(tokens)
    assert torch.allclose(out, ref, atol=1e-5)
    assert float((out - _logits(model, tokens)).abs().max()) > 1e-4


def test_all_ones_intercept_changes_nothing_and_warns(model, tokens):
    ones = 3.0 * torch.ones(model.cfg.d_model)
    clean = _logits(model, tokens)
    with pytest.warns(UserWarning, match="all-ones"), torch.no_grad(), mitigate(model, intercept=ones,
                                                                                attention=False):
        out = model(tokens)
    assert torch.allclose(out, clean, atol=1e-5)
    with pytest.warns(UserWarning, match="LayerNorm"):
        check_intercept(ones + 1e-6 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_intercept(torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(2)))


def test_generate_under_mitigation(model):
    tokens = model.to_tokens("The capital of France is", prepend_bos=False)
    c = fit_intercept(model, dataset_for(model, n=30))
    assert factlens.mitigate is mitigate  # the spelling: factlens.mitigate(model, intercept=c)
    with factlens.mitigate(model, intercept=c) as run:
        out = model.generate(tokens, max_new_tokens=3, do_sample=False, verbose=False)
    assert out.shape == (1, tokens.shape[1] + 3)
    assert all(r.calls >= 3 for r in run.records.values())


def test_template_folds_are_disjoint(model):
    ds = dataset_for(model, shots=1, n=90, seed=4)
    folds = template_folds(ds, 4, seed=1)
    evaluated = sorted(i for _, ev in folds for i in ev)
    assert evaluated == list(range(len(ds)))  # every prompt is evaluated exactly once
    for fit, ev in folds:
        assert not set(fit) & set(ev)
        assert not {ds.prompts[i] for i in fit} & {ds.prompts[i] for i in ev}
        assert not {int(ds.template_ids[i]) for i in fit} & {int(ds.template_ids[i]) for i in ev}
    with pytest.raises(factlens.ConfigError, match="folds"):
        template_folds(ds, 16)


def _hand_intercept(model, ds, idx):
    """Independent pooled fit (numpy): mlp_out = Σ β_j head_j + c at end, last layer."""
    L = model.cfg.n_layers
    _, cache = model.run_with_cache(ds.tokens[idx])
    rows, ends = torch.arange(len(idx)), ds.end[idx]
    z = cache[f"blocks.{L - 1}.attn.hook_z"][rows, ends].double().numpy()  # [n, H, dh]
    W_O = model.blocks[L - 1].attn.W_O.detach().double().numpy()  # [H, dh, d]
    h = np.einsum("nhk,hkd->nhd", z, W_O)
    y = cache[f"blocks.{L - 1}.hook_mlp_out"][rows, ends].double().numpy()
    hc, yc = h - h.mean(0), y - y.mean(0)
    beta = np.linalg.solve(np.einsum("nkd,njd->kj", hc, hc), np.einsum("nkd,nd->k", hc, yc))
    return torch.tensor(y.mean(0) - np.einsum("k,kd->d", beta, h.mean(0)), dtype=torch.float32)


def test_table_cells_match_hand_computation(model):
    table = mitigation_table(model, shots=[0, 1], folds=3, n=45, progress=False)
    rows = table.to_dataframe()
    assert len(rows) == 8 and set(rows["method"]) == {"baseline", "a", "b", "a+b"}
    for (s, m), grp in table.per_prompt.groupby(["shots", "method"]):
        assert sorted(grp["prompt_idx"]) == list(range(45)), (s, m)
    ds = dataset_for(model, shots=0, n=45)
    L = model.cfg.n_layers
    # baseline cell: plain forward, softmax at end
    with torch.no_grad():
        logits = model(ds.tokens)
    probs = torch.softmax(logits[torch.arange(45), ds.end].double(), -1)[torch.arange(45), ds.answer_ids]
    assert table.cell(0, "baseline") == pytest.approx(float(probs.mean()), rel=1e-4)
    # (b) cell: per fold, an independent fit, then raw TL hooks subtracting c at each prompt's end
    hand = torch.zeros(45, dtype=torch.float64)
    for fold, (fit_idx, ev_idx) in enumerate(template_folds(ds, 3, seed=0)):
        c = _hand_intercept(model, ds, fit_idx)
        assert torch.allclose(c, table.intercepts[(0, fold)].float(), atol=1e-4)
        ev = torch.tensor(ev_idx)

        def minus_c(t, hook, ev=ev, c=c):
            t = t.clone()
            t[torch.arange(len(ev)), ds.end[ev]] -= c
            return t

        with torch.no_grad():
            out = model.run_with_hooks(ds.tokens[ev], fwd_hooks=[(f"blocks.{L - 1}.hook_mlp_out", minus_c)])
        hand[ev] = torch.softmax(out[torch.arange(len(ev)), ds.end[ev]].double(), -1)[torch.arange(len(ev)),
                                                                                       ds.answer_ids[ev]]
    assert table.cell(0, "b") == pytest.approx(float(hand.mean()), rel=1e-4)
    acc = float((logits[torch.arange(45), ds.end].argmax(-1) == ds.answer_ids).double().mean())
    assert table.cell(0, "baseline", "accuracy") == pytest.approx(acc)
    # exports
    md = table.to_markdown()
    assert "(a) + (b)" in md and md.count("\n| ") == 8  # 2 shots × 4 methods
    assert table.metadata["peak_memory_mb"] > 0 and table.metadata["folds"] == 3
    assert len(table.plot().data) == 4
    assert table.rows["paper_prob"].isna().all()  # a tiny model has no paper reference


def test_final_layer_effect_decomposes_the_answer_logit(model):
    ds = dataset_for(model, n=20, seed=5)
    eff = final_layer_effect(model, ds, k=5)
    L = model.cfg.n_layers
    with torch.no_grad():
        logits, cache = model.run_with_cache(ds.tokens)
    rows = torch.arange(len(ds))
    ans = logits[rows, ds.end, ds.answer_ids]
    W_eff, b_eff = unembed_params(model)
    x = cache[f"blocks.{L - 1}.hook_resid_pre"][rows, ds.end]
    scale = cache["ln_final.hook_scale"][rows, ds.end]
    pre = ((x - x.mean(-1, keepdim=True)) / scale * W_eff[:, ds.answer_ids].T).sum(-1)
    total = eff.dla.sum(1) + pre + b_eff[ds.answer_ids]
    assert torch.allclose(total, ans, atol=1e-4)
    own = torch.softmax(logits[rows, ds.end], -1)[rows, ds.answer_ids]
    assert torch.allclose(eff.prob_after, own, rtol=1e-4)
    assert eff.components[-1] == f"MLP{L - 1}" and len(eff.to_dataframe()) == model.cfg.n_heads + 2
    assert set(eff.promoted["direction"]) == {"promoted", "demoted"}


@pytest.mark.slow  # the whole analysis, written: .ci/run runs it in its slow step
def test_analyze_writes_a_linked_report(tmp_path):
    model = factlens.tiny("gpt2", seed=3)
    report = analyze(model, out_dir=tmp_path, n=45, folds=3, progress=False)
    index = (tmp_path / "report.html").read_text()
    for f in report.files:
        assert f.exists()
        if f.name != "report.html":
            assert f'href="{f.name}"' in index
    assert not (tmp_path / "plotly.min.js").exists()  # plotly.js is inlined in report.html
    assert "MLP1/pooled" in report.decompositions
    assert report.summary()["P baseline"] == pytest.approx(report.mitigation.cell(0, "baseline"))
