"""The mitigation table of a trained biography checkpoint against a hand computation of (a) and (b).

(a) is rebuilt with a plain TransformerLens hook that overwrites the last layer's ``hook_pattern`` row at each
prompt's ``end`` with a one-hot on ``end``; (b) with an intercept solved by ``torch.linalg.lstsq`` on the
explicit design matrix ``[h_1 ... h_H | I]`` of the other folds' prompts and a ``hook_mlp_out`` hook that
subtracts it at ``end``. Every prompt is scored with an intercept fitted without it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from factlens.bios.run import Run
from factlens.recall.mitigation import template_folds
from factlens.testbeds.bios_recall import bios_relation_dataset
from factlens.testbeds.mechanisms import mechanisms
from factlens.testbeds.mitigations import MITIGATIONS, mitigation_rows

DATA = Path(__file__).parent / "data"
RUNS = [DATA / "bios_demo_run"] + ([DATA / "recall_testbed"] if (DATA / "recall_testbed").exists() else [])
FOLDS = 4


def _forward_probs(model, ds, hooks):
    """P(answer) at each prompt's end, one prompt at a time (no padding), with TL hooks."""
    out = []
    for i in range(len(ds)):
        end = int(ds.positions["end"][i])
        tokens = ds.tokens[i : i + 1, : end + 1]
        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks(end))
        out.append(float(torch.softmax(logits[0, end].double(), -1)[int(ds.answer_ids[i])]))
    return torch.tensor(out, dtype=torch.float64)


def _lstsq_intercept(target, heads):
    """c of ``target_i ≈ Σ_j β_j heads_ij + c`` from the explicit least-squares problem (float64)."""
    n, H, d = heads.shape
    design = torch.cat([heads.permute(0, 2, 1).reshape(n * d, H),  # β columns: head j's coordinates
                        torch.eye(d, dtype=torch.float64).repeat(n, 1)], 1)  # c columns
    sol = torch.linalg.lstsq(design, target.reshape(n * d, 1)).solution[:, 0]
    return sol[H:]


def _hand_table(model, ds, folds):
    last = model.cfg.n_layers - 1
    names = [f"blocks.{last}.hook_mlp_out", f"blocks.{last}.attn.hook_result"]
    model.set_use_attn_result(True)
    targets, heads = [], []
    for i in range(len(ds)):
        end = int(ds.positions["end"][i])
        with torch.no_grad():
            _, cache = model.run_with_cache(ds.tokens[i : i + 1, : end + 1], names_filter=names)
        targets.append(cache[names[0]][0, end].double())
        heads.append(cache[names[1]][0, end].double())  # [H, d], without b_O
    model.set_use_attn_result(False)
    target, head_out = torch.stack(targets), torch.stack(heads)  # [n, d], [n, H, d]

    def self_only(end):
        def fn(pattern, hook):
            pattern[:, :, end, :] = 0.0
            pattern[:, :, end, end] = 1.0
        return [(f"blocks.{last}.attn.hook_pattern", fn)]

    def minus(c, extra):
        def hooks(end):
            def fn(mlp_out, hook):
                mlp_out[:, end] -= c.to(mlp_out.dtype)
            return [*extra(end), (f"blocks.{last}.hook_mlp_out", fn)]
        return hooks

    probs = {"baseline": _forward_probs(model, ds, lambda end: []), "a": _forward_probs(model, ds, self_only)}
    probs["b"], probs["a+b"] = torch.zeros(len(ds), dtype=torch.float64), torch.zeros(len(ds), dtype=torch.float64)
    for fit, ev in template_folds(ds, folds, 0):
        assert not {int(ds.template_ids[i]) for i in fit} & {int(ds.template_ids[i]) for i in ev}
        c = _lstsq_intercept(target[fit], head_out[fit])
        sub = ds.select(ev)
        probs["b"][ev] = _forward_probs(model, sub, minus(c, lambda end: []))
        probs["a+b"][ev] = _forward_probs(model, sub, minus(c, self_only))
    return probs


@pytest.mark.parametrize("run", RUNS, ids=lambda p: p.name)
def test_mitigation_table_equals_hand_computation(run):
    res = mechanisms(run, attributes=["birth_place"], n=24, folds=FOLDS, progress=False)
    testbed = Run(run)
    ds = bios_relation_dataset(testbed.population(), testbed.vocab(), "birth_place", n=24, seed=0)
    model = testbed.bridge(res.steps[-1], "cpu")
    hand = _hand_table(model, ds, FOLDS)
    rows = mitigation_rows(model, ds, folds=FOLDS).set_index("method")
    table = res.mitigations[res.mitigations["step"] == res.steps[-1]].set_index("method")
    for m in MITIGATIONS:
        torch.testing.assert_close(torch.tensor(rows.loc[m, "prob"], dtype=torch.float64), hand[m],
                                   atol=2e-5, rtol=1e-4)
        assert table.loc[m, "mean_prob"] == pytest.approx(float(hand[m].mean()), abs=2e-5)
    assert table.loc["baseline", "mean_prob"] == pytest.approx(float(res.measure("prob")[-1, 0]), abs=1e-6)
    # (a) and (b) each change the computation: a mitigation that did nothing would equal the baseline
    for m in ("a", "b", "a+b"):
        assert (hand[m] - hand["baseline"]).abs().max() > 1e-3
    assert set(rows.loc["b", "fold"]) == set(range(FOLDS)), "every prompt is scored by an out-of-fold intercept"
    wide = res.mitigation_table()
    assert wide.loc["birth_place", ("mean_prob", "a+b")] == table.loc["a+b", "mean_prob"]


def test_logit_lens_last_layer_is_the_model(tmp_path):
    run = RUNS[-1]
    res = mechanisms(run, attributes=["company"], n=16, folds=2, progress=False)
    assert res.lens.shape == (1, 1, res.lens.shape[2])
    assert float(res.lens[-1, 0, -1]) == pytest.approx(float(res.measure("prob")[-1, 0]), abs=1e-6)
    assert float(res.lens[-1, 0, -2]) == pytest.approx(float(res.measure("prob_before")[-1, 0]), abs=1e-6)


def test_rows_match_the_capitals_mitigation_table():
    """On a relation's prompts, mitigation_rows gives factlens.recall's mitigation table (same folds and fit)."""
    import factlens
    from factlens.recall.datasets import dataset_for
    from factlens.recall.mitigation import mitigation_table

    model = factlens.tiny("gpt2", compat=True)
    table = mitigation_table(model, shots=[0], folds=3, seed=0, progress=False)
    rows = mitigation_rows(model, dataset_for(model, shots=0, seed=0), folds=3, seed=0).set_index("method")
    for m in MITIGATIONS:
        assert rows.loc[m, "mean_prob"] == pytest.approx(table.cell(0, m), rel=1e-5, abs=1e-9)
        assert rows.loc[m, "accuracy"] == pytest.approx(table.cell(0, m, "accuracy"))
