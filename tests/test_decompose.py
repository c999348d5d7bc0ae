"""Tests for factlens.recall.regression: the pooled-β / vector-intercept regression and vocabulary projection."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import plotly.graph_objects as go
import pytest
import torch
from hypothesis import assume, given, settings

from factlens.errors import ConfigError, EmptyDatasetError, ShapeError
from factlens.recall.regression import (
    Decomposition,
    fit_decomposition,
    fit_per_group,
    head_names,
    project_to_vocab,
)
from factlens.tokenizers import gpt2_tokenizer


def _synthetic(n, k, d, seed, noise=0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, k, d, generator=g, dtype=dtype)
    beta = torch.rand(k, generator=g, dtype=dtype) * 4 - 2
    c = torch.randn(d, generator=g, dtype=dtype) * 3
    m = torch.einsum("nkd,k->nd", h, beta) + c + noise * torch.randn(n, d, generator=g, dtype=dtype)
    return m, h, beta, c


def _naive_lstsq(m, h):
    """Reference: the full design matrix [n*d, k + d] solved by lstsq (β shared, one intercept per coord)."""
    n, k, d = h.shape
    x_beta = h.permute(0, 2, 1).reshape(n * d, k)  # row (i, c): h_{i, :, c}
    x_int = torch.eye(d, dtype=h.dtype).repeat(n, 1)  # row (i, c): e_c
    sol = torch.linalg.lstsq(torch.cat([x_beta, x_int], 1), m.reshape(n * d, 1)).solution[:, 0]
    return sol[:k], sol[k:]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 40), k=st.integers(1, 6), d=st.integers(2, 24), seed=st.integers(0, 10_000))
def test_exact_recovery_without_noise(n, k, d, seed):
    assume((n - 1) * d >= 2 * k)  # enough centred equations for k shared coefficients
    m, h, beta, c = _synthetic(n, k, d, seed)
    fit = fit_decomposition(m, h)
    torch.testing.assert_close(fit.beta, beta, atol=1e-6, rtol=0)
    torch.testing.assert_close(fit.intercept, c, atol=1e-6, rtol=0)
    assert math.isclose(fit.r2, 1.0, abs_tol=1e-6)
    assert fit.n_samples == n and fit.beta.dtype == torch.float64
    torch.testing.assert_close(fit.predict(h), m, atol=1e-6, rtol=0)
    assert fit.residual(m, h).abs().max() < 1e-6


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 5), d=st.integers(8, 32), seed=st.integers(0, 10_000))
def test_recovery_with_small_noise_matches_reference(k, d, seed):
    m, h, beta, c = _synthetic(60, k, d, seed, noise=0.01)
    fit = fit_decomposition(m, h)
    torch.testing.assert_close(fit.beta, beta, atol=0.02, rtol=0)
    torch.testing.assert_close(fit.intercept, c, atol=0.03, rtol=0)
    true_sse = float(((m - torch.einsum("nkd,k->nd", h, beta) - c) ** 2).sum())
    sst = float(((m - m.mean(0)) ** 2).sum())
    assert 1 - true_sse / sst <= fit.r2 < 1.0  # least squares never fits worse than the truth
    ref_beta, ref_c = _naive_lstsq(m, h)  # same estimator, solved the slow way
    torch.testing.assert_close(fit.beta, ref_beta, atol=1e-8, rtol=0)
    torch.testing.assert_close(fit.intercept, ref_c, atol=1e-8, rtol=0)


def test_fewer_prompts_than_regressors_is_identified_when_d_is_large():
    # β is shared over d coordinates, so n = 6 prompts identify k = 12 heads when d = 64.
    m, h, beta, _ = _synthetic(6, 12, 64, seed=0)
    fit = fit_decomposition(m, h, regressor_names=head_names(9, 12))
    torch.testing.assert_close(fit.beta, beta, atol=1e-6, rtol=0)
    assert fit.regressor_names[8] == "L9H8"


def test_float32_input_and_no_intercept():
    m, h, beta, _ = _synthetic(30, 3, 16, seed=1, dtype=torch.float32)
    m = torch.einsum("nkd,k->nd", h, beta)
    fit = fit_decomposition(m, h, fit_intercept=False)
    assert fit.beta.dtype == torch.float32 and (fit.intercept == 0).all()
    torch.testing.assert_close(fit.beta, beta, atol=1e-5, rtol=0)


def test_rank_deficient_raises_and_ridge_fixes():
    m, h, _, _ = _synthetic(20, 3, 8, seed=2)
    dup = torch.cat([h, h[:, :1]], 1)  # regressor 3 == regressor 0
    with pytest.raises(ConfigError, match="ridge>0"):
        fit_decomposition(m, dup)
    fit = fit_decomposition(m, dup, ridge=1e-6)
    assert torch.isfinite(fit.beta).all() and fit.r2 > 0.999
    assert abs(float(fit.beta[0] + fit.beta[3]) - float(fit_decomposition(m, h).beta[0])) < 1e-4
    with pytest.raises(ConfigError, match="add prompts"):
        fit_decomposition(m[:1], h[:1])  # one prompt: nothing left after centring
    m2, h2, _, _ = _synthetic(3, 5, 2, seed=3)
    with pytest.raises(ConfigError, match="rank-deficient"):
        fit_decomposition(m2, h2)  # (n - 1) * d = 4 centred equations < k = 5 unknowns
    const = h[:1].expand(20, -1, -1)  # regressors identical across prompts
    with pytest.raises(ConfigError):
        fit_decomposition(m, const)


@pytest.mark.usefixtures("unchecked")  # wrong shapes on purpose: factlens's own ShapeError
def test_shape_and_value_errors():
    m, h, _, _ = _synthetic(10, 2, 4, seed=3)
    with pytest.raises(ShapeError):
        fit_decomposition(m[:9], h)
    with pytest.raises(ShapeError):
        fit_decomposition(m[:, :3], h)
    with pytest.raises(ShapeError):
        fit_decomposition(m, h[:, 0])
    bad = m.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ShapeError, match="NaN"):
        fit_decomposition(bad, h)
    inf = h.clone()
    inf[1, 1, 1] = float("inf")
    with pytest.raises(ShapeError):
        fit_decomposition(m, inf)
    with pytest.raises(ShapeError, match="names"):
        fit_decomposition(m, h, regressor_names=["a"])
    with pytest.raises(EmptyDatasetError):
        fit_decomposition(m[:0], h[:0])
    with pytest.raises(ShapeError):
        fit_decomposition(m, h).predict(h[:, :1])


def test_dataframe_and_plot():
    m, h, beta, _ = _synthetic(12, 3, 6, seed=4)
    fit = fit_decomposition(m, h, regressor_names=["a", "b", "c"])
    df = fit.to_dataframe()
    assert list(df["regressor"]) == ["a", "b", "c"]
    assert df["beta"].tolist() == pytest.approx(beta.tolist(), abs=1e-6)
    assert df["share"].tolist() == pytest.approx((1 + beta).tolist(), abs=1e-6)
    fig = fit.plot()
    assert isinstance(fig, go.Figure) and fig.layout.yaxis.title.text.startswith("β")
    assert {s.y0 for s in fig.layout.shapes} == {-1, 0}
    assert any(a.text == "erased" for a in fig.layout.annotations)
    assert "β =" in fig.data[0].hovertext[0]


def test_per_group_fits_each_group_separately():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(30, 2, 8, generator=g, dtype=torch.float64)
    c_a = torch.randn(8, generator=g, dtype=torch.float64)
    c_b = torch.randn(8, generator=g, dtype=torch.float64)
    labels = ["France"] * 15 + ["Japan"] * 15
    m = torch.cat([h[:15, 0] - h[:15, 1] + c_a, 0.5 * h[15:, 1] + c_b])
    res = fit_per_group(m, h, labels, regressor_names=["x", "y"])
    assert res.labels == ["France", "Japan"] and len(res) == 2
    torch.testing.assert_close(res["France"].beta, torch.tensor([1.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(res["Japan"].beta, torch.tensor([0.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(res.intercepts, torch.stack([c_a, c_b]))
    df = res.to_dataframe()
    assert len(df) == 4 and set(df["group"]) == {"France", "Japan"}
    assert isinstance(res.plot(), go.Figure)
    ranks = res.intercept_ranks(torch.eye(8, dtype=torch.float64),
                                {"France": int(c_a.argmax()), "Japan": int(c_b.argmin())})
    assert ranks["rank"].tolist() == [0, 7]
    with pytest.raises(ConfigError, match="Japan"):
        fit_per_group(m, h, ["France"] * 29 + ["Japan"])  # one Japan prompt: rank-deficient
    with pytest.raises(ShapeError):
        fit_per_group(m, h, labels[:-1])
    with pytest.raises(ConfigError):
        res["Spain"]


def test_projection_ranks_planted_answer_first():
    tok = gpt2_tokenizer()
    g = torch.Generator().manual_seed(6)
    d, vocab = 32, len(tok)
    W_U = torch.randn(d, vocab, generator=g) / d**0.5
    paris = 6342
    direction = W_U[:, paris] / W_U[:, paris].norm()
    vec = 10 * direction + 0.1 * torch.randn(d, generator=g)
    proj = project_to_vocab(vec, W_U, tok, k=5, answer_ids=[paris, 11790])
    assert proj.answer_ranks[0] == 0 and proj.top_ids[0] == paris and proj.top_tokens[0] == " Paris"
    assert proj.answer_ranks[1] > 0
    assert proj.answer_ranks[1] == int((proj.logits > proj.logits[11790]).sum())
    assert torch.all(proj.top_logits[:-1] >= proj.top_logits[1:])
    df = proj.to_dataframe()
    assert list(df["kind"]).count("top") == 5
    assert df.loc[df.kind == "answer", "token"].tolist() == [" Paris", " Tokyo"]
    fig = proj.plot()
    assert fig.data[0].orientation == "h" and "Paris" in fig.data[0].y[-1]
    scaled = project_to_vocab(vec, W_U, None, k=5, ln_scale=torch.tensor([[2.0], [2.0]]))
    torch.testing.assert_close(scaled.logits, proj.logits / 2)
    assert scaled.top_tokens[0] == f"#{paris}"


def test_intercept_logits_and_bias():
    fit = Decomposition(beta=torch.zeros(1), intercept=torch.tensor([1.0, -2.0]), r2=1.0, n_samples=3,
                        regressor_names=["a"])
    W_U = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]])
    b_U = torch.tensor([0.0, 0.0, 5.0])
    torch.testing.assert_close(fit.intercept_logits(W_U), torch.tensor([1.0, -2.0, 0.0]))
    torch.testing.assert_close(fit.intercept_logits(W_U, ln_scale=2.0, b_U=b_U),
                               torch.tensor([0.5, -1.0, 5.0]))
    with pytest.raises(ShapeError, match="W_U"):
        fit.intercept_logits(W_U.T)
    with pytest.raises(ShapeError):
        fit.intercept_logits(W_U, ln_scale=0.0)
    with pytest.raises(ConfigError):
        project_to_vocab(fit.intercept, W_U, None, k=4)
