"""The recall mechanisms over a run's checkpoints (factlens.testbeds.mechanisms) and the exact final-layer
split (factlens.recall.final_layer)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

import factlens
from factlens.bios.data.pools import no_knowledge_baseline
from factlens.bios.phases import ratio_phases
from factlens.bios.run import Run, load_bridge
from factlens.cli import main
from factlens.errors import CheckpointError, ConfigError
from factlens.hooks import Intervention
from factlens.recall.datasets import dataset_for, make_prompt_dataset
from factlens.recall.final_layer import (
    final_layer_effect,
    final_layer_hooks,
    final_layer_split,
    split_from_run,
)
from factlens.recall.forward import run_at_end, unembed_params
from factlens.recall.lens import logit_lens
from factlens.testbeds import mechanisms as mech
from factlens.testbeds import mechanisms_result as mres
from factlens.tokenizers import gpt2_tokenizer

RUN = Path(__file__).parent / "data" / "bios_demo_run"


# ------------------------------------------------------------------------------------------ the command
def test_command_runs_on_the_shipped_run_and_writes_its_figure(tmp_path):
    out = tmp_path / "mech"
    assert main(["bios", "mechanisms", "--run", str(RUN), "--attributes", "birth_place", "--prompts", "48",
                 "--out", str(out), "--quiet"]) == 0
    html = (out / "mechanisms.html").read_text()
    assert "training step" in html and "no-knowledge baseline" in html
    df = pd.read_csv(out / "mechanisms.csv")
    assert df[["step", "attribute"]].values.tolist() == [[1000, "birth_place"]]
    row = df.iloc[0]
    # the trained model recalls birth places (chance is 1/60), and its top path-patching head reads the name
    assert row["prob"] > 0.3 and row["accuracy"] > 0.5
    assert row["top_head_effect"] < 0 and row["name_attention"] > 0.8
    assert row["type_purity"] >= 0.8  # the last MLP's intercept points at cities
    assert row["attr_loss"] < no_knowledge_baseline(Run(RUN).population().pools)
    parts = row[[f"final_{p}" for p in mres.FINAL_PARTS]].sum()
    assert parts == pytest.approx(row["delta_logit"], abs=1e-6)
    heads = pd.read_csv(out / "top_heads.csv")
    assert heads["effect"].is_monotonic_increasing and len(heads) == 3


def test_bad_runs_and_arguments_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json"):
        mech.mechanisms(tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="available"):
        mech.mechanisms(RUN, steps=[7], progress=False)
    with pytest.raises(ConfigError, match="attribute"):
        mech.mechanisms(RUN, attributes=["shoe_size"], progress=False)
    out = tmp_path / "a_file"
    out.write_text("keep me")
    assert main(["bios", "mechanisms", "--run", str(RUN), "--attributes", "major", "--prompts", "16",
                 "--out", str(out), "--quiet"]) == 2
    assert out.read_text() == "keep me"


# ------------------------------------------------------------------------------ the final-layer split
@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_final_layer_split_refuses_a_model_outside_compat_mode(arch):
    """One rule for every Lv analysis (factlens.loading.require_compat): compatibility mode, or a ModeError."""
    model = factlens.tiny(arch, compat=False)
    with pytest.raises(factlens.ModeError, match="compat=True"):
        final_layer_split(model, dataset_for(model, n=4))


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_final_layer_split_adds_up_to_the_total(arch):
    model = factlens.tiny(arch, compat=True)
    ds = dataset_for(model, n=8)
    split = final_layer_split(model, ds, neurons=True)
    assert split.parts[-3:] == ["attn_bias", f"MLP{model.cfg.n_layers - 1}", "ln_scale"]
    # exact: the parts add up to the change of the answer logit, P and log P
    assert (split.logit.sum(1) - split.total_logit).abs().max() < 1e-10
    assert (split.prob.sum(1) - split.total_prob).abs().max() < 1e-10
    assert (split.logprob.sum(1) - (split.prob_after.log() - split.prob_before.log())).abs().max() < 1e-9
    # the totals are the model's: the logit lens before the last layer and the model's own output after it
    lens = logit_lens(model, ds)
    assert torch.allclose(split.prob_before.float(), lens.prob[-3], rtol=1e-4, atol=1e-9)
    assert torch.allclose(split.prob_after.float(), lens.prob[-1], rtol=1e-4, atol=1e-9)
    # the direct parts, read through the exact final scale, agree with final_layer_effect's (float32, hooked scale)
    dla = final_layer_effect(model, ds).dla.double()  # [n, H + 2]
    assert torch.allclose(split.logit[:, :-1], dla, atol=1e-5)
    # the MLP part is its neurons plus its output bias b_out
    last = model.cfg.n_layers - 1
    W_eff, _ = unembed_params(model)
    u = W_eff.double()[:, ds.answer_ids].T  # [n, d]
    b_out = model.blocks[last].mlp.b_out.detach().double()
    bias_part = ((b_out - b_out.mean()) * u).sum(-1) / split.scale_after
    assert torch.allclose(split.neuron_logit.sum(1) + bias_part, split.logit[:, -2], atol=1e-6)
    assert split.top_neurons(3)["index"].nunique() == 3


def test_final_layer_split_on_a_hand_built_case():
    """Last layer made to output ``x_b`` itself (attention output 0, MLP output := resid_pre): the residual
    doubles, so every logit stays put; the MLP's direct part must be cancelled by the LN-scale part."""
    model = factlens.tiny("gpt2")
    ds = dataset_for(model, n=6)
    last = model.cfg.n_layers - 1
    store = {}
    iv = Intervention("attn_out := 0, mlp_out := resid_pre")
    iv.add(f"blocks.{last}.hook_resid_pre", lambda t, hook: store.__setitem__("x", t.clone()))
    iv.add(f"blocks.{last}.hook_attn_out", lambda t, hook: torch.zeros_like(t))
    iv.add(f"blocks.{last}.hook_mlp_out", lambda t, hook: store["x"].to(t.dtype))
    run = run_at_end(model, ds, final_layer_hooks(model), interventions=[iv], on_no_effect="ignore")
    split = split_from_run(model, ds, run)
    by = dict(zip(split.parts, split.logit.T))
    direct_b = split.logit_before - unembed_params(model)[1].double()[ds.answer_ids]  # ⟨centre(x_b), u⟩ / s_b
    eps = model.ln_final.original_component.eps
    ratio = split.scale_before / ((4 * (split.scale_before**2 - eps) + eps).sqrt())  # s_b / s_a for x_a = 2 x_b
    assert torch.allclose(split.scale_before / split.scale_after, ratio, rtol=1e-5)
    assert torch.allclose(split.total_logit, direct_b * (2 * ratio - 1), rtol=1e-4, atol=1e-6)  # ≈ 0 but for eps
    heads_and_bias = sum(v for k, v in by.items() if k not in (f"MLP{last}", "ln_scale"))
    assert heads_and_bias.abs().max() < 1e-6  # the zeroed attention contributes nothing
    assert torch.allclose(by[f"MLP{last}"], direct_b * ratio, rtol=1e-4, atol=1e-6)
    assert torch.allclose(by["ln_scale"], direct_b * (ratio - 1), rtol=1e-4, atol=1e-6)
    assert float(by["ln_scale"].abs().min()) > 0.3 * float(by[f"MLP{last}"].abs().min())  # a real LN-scale part
    assert (split.logit.sum(1) - split.total_logit).abs().max() < 1e-10


# ------------------------------------------------------------------------------------------ type purity
def test_type_purity_is_one_for_an_intercept_made_of_one_attributes_values():
    population, vocab = Run(RUN).population(), Run(RUN).vocab()
    model = load_bridge(RUN)
    W_eff, _ = unembed_params(model)
    W_E = model.W_E.detach()  # [vocab, d]
    cities = mech.value_first_tokens(population, vocab, "birth_place")
    majors = mech.value_first_tokens(population, vocab, "major")
    assert not set(cities) & set(majors)
    intercept = W_E[cities].sum(0)  # the cities' own embeddings
    assert mech.type_purity(intercept, W_eff, cities, k=10) == 1.0
    assert mech.type_purity(intercept, W_eff, majors, k=10) == 0.0
    assert mech.type_purity(W_E[majors].sum(0), W_eff, majors, k=10) == 1.0
    with pytest.raises(ConfigError, match="empty"):
        mech.type_purity(intercept, W_eff, [])


# ------------------------------------------------------------------------------------------ attention
def _pattern_edit(ds, layer: int, to_name: int, away: int):
    """Set head ``to_name``'s attention from ``end`` onto the name span and head ``away``'s onto position 0."""
    def factory(rows, ends):
        def edit(t, hook):
            out = t.clone()
            r = torch.arange(len(rows))
            keys = torch.arange(t.shape[-1])
            span = ((keys[None] >= ds.positions["N"][rows, None]) & (keys[None] <= ds.positions["N_last"][rows, None]))
            out[r, to_name, ends] = span.to(t.dtype) / span.sum(-1, keepdim=True)
            out[r, away, ends] = 0.0
            out[r, away, ends, 0] = 1.0
            return out

        iv = Intervention("name-reading head vs. a head that looks away")
        iv.add(f"blocks.{layer}.attn.hook_pattern", edit)
        return [iv]

    return factory


def test_a_head_that_attends_to_the_name_scores_higher_than_one_that_does_not():
    model = factlens.tiny("gpt2")
    items = [(f"As we know, {name} was born in", name, city) for name, city in
             [("Ada Lovelace", "London"), ("Alan Turing", "London"), ("Marie Curie", "Warsaw"),
              ("Grace Hopper", "New York"), ("Emmy Noether", "Erlangen"), ("Kurt Gödel", "Brno")]]
    ds = make_prompt_dataset(items, gpt2_tokenizer(), first_piece=True)
    attention = mech.name_attention(model, ds, interventions=_pattern_edit(ds, layer=1, to_name=2, away=0))
    assert attention.shape == (2, 4)
    assert torch.allclose(attention[1, 2], torch.tensor(1.0)) and float(attention[1, 0]) == 0.0
    assert int(attention[1].argmax()) == 2
    untouched = mech.name_attention(model, ds)
    assert float(untouched[1, 2]) < 0.99 and torch.allclose(attention[0], untouched[0])


# ------------------------------------------------------------------------------------- phases and onset
def _result(delta_prob: list[float], losses: list[float]) -> mres.MechanismsResult:
    steps = [0, 100, 200, 300, 400, 500][: len(delta_prob)]
    values = torch.zeros(len(steps), 1, len(mres.MEASURES), dtype=torch.float64)
    values[:, 0, mres.MEASURES.index("delta_prob")] = torch.tensor(delta_prob, dtype=torch.float64)
    drop, plateau = ratio_phases(steps, losses, 6.0)
    return mres.MechanismsResult(steps=steps, attributes=["birth_place"], values=values,
                                 final_logit=torch.zeros(len(steps), 1, 4, dtype=torch.float64),
                                 top_heads=pd.DataFrame(), attr_loss=torch.tensor(losses, dtype=torch.float64),
                                 loss_steps=steps, loss_curve=losses, baseline=6.0, drop_end=drop, plateau_end=plateau)


def test_suppression_onset_and_phases():
    res = _result([0.1, -0.1, 0.2, -0.01, -0.2, -0.3], [40.0, 6.3, 6.1, 6.0, 3.0, 1.0])
    assert res.suppression_from() == 300 and res.suppression_from("birth_place", tol=0.05) == 400
    assert (res.drop_end, res.plateau_end) == (100, 400)
    assert [p[0] for p in res.phases()] == ["1 initial drop", "2 plateau", "3 knowledge"]
    assert _result([0.1, 0.2, -0.1, 0.1], [40.0, 30.0, 20.0, 10.0]).suppression_from() is None
    fig = res.plot()
    assert fig.layout.xaxis7.title.text == "training step"
    assert "suppression from 300" in repr(res)
