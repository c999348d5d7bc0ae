"""Metrics at end, the logit lens, the mover check and the MLP decomposition on tiny GPT-2 and OPT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import factlens
from factlens.models import bridge_from_hf, build_hf
from factlens.recall import (
    answer_prob,
    answer_rank,
    dataset_for,
    decompose_mlp,
    end_logits,
    logit_diff,
    logit_lens,
    metric,
    mover_scores,
    pearson,
    run_at_end,
    unembed_params,
)


@pytest.fixture(scope="module", params=["gpt2", "opt"])
def model(request):
    return factlens.tiny(request.param)


@pytest.fixture(scope="module")
def ds(model):
    return dataset_for(model, n=40, seed=0)


@pytest.fixture(scope="module")
def full(model, ds):
    with torch.no_grad():
        return model.run_with_cache(ds.tokens.to(model.cfg.device))


def test_dataset_convention(model, ds):
    first = int(ds.tokens[0, 0])
    if factlens.models.family_of(model) == "gpt2":
        assert first != model.tokenizer.bos_token_id and ds.n_special_prefix == 0  # Lv et al.: no BOS
    else:
        assert first == model.tokenizer.bos_token_id and ds.n_special_prefix == 1


def test_run_at_end_matches_full_forward(model, ds, full):
    logits, cache = full
    run = run_at_end(model, ds, ["blocks.1.hook_mlp_out", "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_z"],
                     max_batch=7)
    rows = torch.arange(len(ds))
    assert torch.allclose(run.logits, logits[rows, ds.end], atol=1e-5)
    assert torch.allclose(run["blocks.1.hook_mlp_out"], cache["blocks.1.hook_mlp_out"][rows, ds.end], atol=1e-6)
    assert torch.allclose(run["blocks.1.attn.hook_z"], cache["blocks.1.attn.hook_z"][rows, ds.end], atol=1e-6)
    pat = run["blocks.0.attn.hook_pattern"]  # [n, head, key]
    ref = cache["blocks.0.attn.hook_pattern"][rows, :, ds.end]
    assert torch.allclose(pat, ref, atol=1e-6)



def test_run_at_end_chunks_by_length_and_returns_dataset_order(model, ds, full):
    """Chunks group prompts of similar length (less padding); results still come back in dataset order."""
    _, cache = full
    seen = []

    def factory(rows, ends):
        seen.append((rows.clone(), ends.clone()))
        return []

    run = run_at_end(model, ds, ["blocks.1.hook_resid_post"], logits=False, max_batch=6, interventions=factory)
    rows = torch.cat([r for r, _ in seen])
    assert sorted(rows.tolist()) == list(range(len(ds)))  # every prompt once
    assert torch.equal(ds.end[rows], torch.cat([e for _, e in seen]))
    assert bool((torch.diff(ds.end[rows]) >= 0).all()) and len(set(ds.end.tolist())) > 1
    assert run.logits is None
    ref = cache["blocks.1.hook_resid_post"][torch.arange(len(ds)), ds.end]
    assert torch.allclose(run["blocks.1.hook_resid_post"], ref, atol=1e-5)

def test_metrics_by_hand(ds):
    g = torch.Generator().manual_seed(0)
    vocab = 50300
    logits = torch.randn(len(ds), ds.tokens.shape[1], vocab, generator=g)
    el = end_logits(logits, ds)
    i = 3
    row = logits[i, ds.end[i]]
    a, s = int(ds.answer_ids[i]), int(ds.subject_ids[i])
    assert torch.equal(el[i], row)
    assert answer_prob(logits, ds)[i] == pytest.approx(float(torch.softmax(row.double(), -1)[a]), rel=1e-5)
    assert int(answer_rank(logits, ds)[i]) == int((row > row[a]).sum())
    assert logit_diff(logits, ds, "iw")[i] == pytest.approx(float(row[a] - row.mean()), abs=1e-5)
    assert logit_diff(logits, ds, "n")[i] == pytest.approx(float(row[s] - row.mean()), abs=1e-5)
    assert logit_diff(logits, ds, "iw-n")[i] == pytest.approx(float(row[a] - row[s]), abs=1e-5)
    # a planted argmax has rank 0; TL-style metric callables accept [n, pos, vocab] and [n, vocab]
    el2 = el.clone()
    el2[i, a] = el2.max() + 1
    assert int(answer_rank(el2, ds)[i]) == 0
    m = metric(ds, "prob")
    assert float(m(logits)) == pytest.approx(float(m(el)), rel=1e-6)
    assert metric(ds, "iw", reduce="none")(logits).shape == (len(ds),)
    with pytest.raises(factlens.ShapeError):
        answer_prob(logits[:3], ds)


def test_logit_lens_last_layer_is_model_probability(model, ds, full):
    logits, _ = full
    lens = logit_lens(model, ds, max_batch=16)
    own = torch.softmax(logits[torch.arange(len(ds)), ds.end].double(), -1)[torch.arange(len(ds)), ds.answer_ids]
    L = model.cfg.n_layers
    assert lens.labels[-1] == "model" and lens.prob.shape == (L + 1, len(ds))
    assert torch.allclose(lens.prob[L - 1].double(), own, rtol=1e-4, atol=0)
    assert torch.allclose(lens.prob[L].double(), own, rtol=1e-4, atol=0)
    eff = lens.final_layer_effect()
    assert eff["delta_prob"] == pytest.approx(eff["prob_after"] - eff["prob_before"])
    assert eff["prob_before"] == pytest.approx(float(lens.prob[L - 2].mean()))
    df = lens.to_dataframe()
    assert len(df) == (L + 1) * len(ds)
    assert len(lens.plot().data) == 2


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
@pytest.mark.parametrize("compat", [False, True])
def test_unembed_params_fold_the_final_layernorm(arch, compat):
    hf = build_hf(arch, seed=2)
    lnf = hf.transformer.ln_f if arch == "gpt2" else hf.model.decoder.final_layer_norm
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lnf.weight.copy_(torch.rand(64, generator=g) + 0.5)
        lnf.bias.copy_(torch.randn(64, generator=g))
    model = bridge_from_hf(hf, compat=compat)
    tokens = dataset_for(model, n=3).tokens
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    x = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    W_eff, b_eff = unembed_params(model)
    u = (x - x.mean(-1, keepdim=True)) / cache["ln_final.hook_scale"]
    assert torch.allclose(u @ W_eff + b_eff, logits, atol=2e-4)


def test_pearson_matches_numpy():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 2, 3, generator=g), torch.randn(30, 2, 3, generator=g)
    r = pearson(x, y)
    assert r[1, 2] == pytest.approx(np.corrcoef(x[:, 1, 2].numpy(), y[:, 1, 2].numpy())[0, 1], abs=1e-10)
    assert torch.isnan(pearson(torch.ones(5, 1), torch.randn(5, 1, generator=g)))[0]


def test_movers_by_hand(model, ds, full):
    _, cache = full
    res = mover_scores(model, ds, max_batch=16)
    layer, head, i = 1, 2, 5
    e, n_pos = int(ds.end[i]), int(ds.positions["N"][i])
    att = cache[f"blocks.{layer}.attn.hook_pattern"][i, head, e, n_pos]
    out = cache[f"blocks.{layer}.attn.hook_z"][i, e, head] @ model.blocks[layer].attn.W_O[head].detach()
    proj = out @ model.W_U.detach()[:, int(ds.subject_ids[i])]
    assert float(res.attention[i, layer, head]) == pytest.approx(float(att), abs=1e-6)
    assert float(res.projection[i, layer, head]) == pytest.approx(float(proj), rel=1e-4, abs=1e-6)
    assert float(res.r[layer, head]) == pytest.approx(
        float(np.corrcoef(res.attention[:, layer, head], res.projection[:, layer, head])[0, 1]), abs=1e-6)
    top = res.top(3)
    assert list(top["score"]) == sorted(res.to_dataframe()["score"], reverse=True)[:3]
    assert len(res.to_dataframe(per_prompt=True)) == len(ds) * model.cfg.n_layers * model.cfg.n_heads
    assert len(res.plot(layer, head).data[0].x) == len(ds)


@pytest.mark.parametrize("layer", [0, -1])
def test_decomposition_recovers_an_exact_linear_mlp(model, layer):
    """With the MLP replaced by Σ β_j head_j + c (heads without b_O), the fit returns β and c exactly."""
    ds = dataset_for(model, n=60, seed=1)
    L, H, d = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model
    lay = layer % L
    g = torch.Generator().manual_seed(7)
    beta = torch.randn(H, generator=g)
    c = torch.randn(d, generator=g)
    W_O = model.blocks[lay].attn.W_O.detach()
    seen = {}

    def keep_z(z, hook):
        seen["z"] = z

    def linear_mlp(mlp_out, hook):
        heads = torch.einsum("bphk,hkd->bphd", seen["z"], W_O)  # [b, p, H, d]
        return torch.einsum("bphd,h->bpd", heads, beta) + c

    with factlens.intervene(model, factlens.hook(f"blocks.{lay}.attn.hook_z", keep_z),
                            on_no_effect="ignore"), \
            factlens.intervene(model, factlens.hook(f"blocks.{lay}.hook_mlp_out", linear_mlp)):
        res = decompose_mlp(model, ds, layer=layer, max_batch=25)
    assert res.r2 == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(res.beta.double(), beta.double(), atol=1e-4)
    assert torch.allclose(res.intercept.double(), c.double(), atol=1e-4)
    assert res.to_dataframe()["regressor"].tolist() == [f"L{lay}H{h}" for h in range(H)]
    assert set(res.answer_ranks["subject"]) == set(ds.subjects)


def test_decomposition_per_subject(model):
    ds = dataset_for(model, subjects=["France", "Japan", "Italy"])
    res = decompose_mlp(model, ds, layer=-1, group_by="subject", k=5)
    assert res.beta.shape == (3, model.cfg.n_heads) and res.intercept.shape == (3, model.cfg.d_model)
    ranks = res.answer_ranks.set_index("subject")
    proj = res.projections["Japan"]
    assert int(ranks.loc["Japan", "rank"]) == int(proj.answer_ranks[0])
    assert int(proj.answer_ids[0]) == 11790  # " Tokyo"
    assert len(res.intercept_table()) == 3 * (5 + 1)
