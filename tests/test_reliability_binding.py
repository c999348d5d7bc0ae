"""Objects bound to what they were built for, edits that must not stack, and "changed" proven on the output.

- An intervention carries the architecture it was resolved for; another model refuses it.
- A dataset carries its tokenizer's vocabulary and BOS convention; a metric and a shared run carry their
  dataset's fingerprint; each reader refuses another one.
- The same edit twice (nested blocks, one call, nested ``mitigate``) is refused.
- An edit of a tensor the model does not consume (OPT's ``pos_embed.hook_in``: the attention mask) is refused
  because the output did not move, measured against a clean replay of the same forward pass.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import factlens
from factlens import recall
from factlens.edits import add_vector, attend_to_self, patch_pattern
from factlens.errors import (
    ArchitectureMismatchError,
    ConfigError,
    HookDidNotFireError,
    InterventionNoEffectError,
    ShapeError,
    TokenizationError,
)
from factlens.hooks import model_signature
from factlens.recall.datasets import make_dataset
from factlens.recall.relations import CAPITALS
from factlens.tokenizers import gpt2_tokenizer, opt_style_tokenizer

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def twins() -> dict:
    return {"gpt2": factlens.tiny("gpt2"), "opt": factlens.tiny("opt"), "gpt2-3": factlens.tiny("gpt2", n_layer=3),
            "gpt2-wide": factlens.tiny("gpt2", n_embd=32, n_head=2), "gpt2-8h": factlens.tiny("gpt2", n_head=8)}


# ------------------------------------------------------------------------------------ interventions and models
@pytest.mark.parametrize(("built", "used", "named"), [
    ("gpt2", "gpt2-3", "n_layers: 2 vs 3"),
    ("gpt2-3", "gpt2", "n_layers: 3 vs 2"),
    ("gpt2", "gpt2-8h", "n_heads: 4 vs 8"),
    ("gpt2", "gpt2-wide", "d_model: 64 vs 32"),
    ("gpt2", "opt", "family: gpt2 vs opt"),
])
@pytest.mark.parametrize("build", ["attend_to_self", "add_vector", "patch_pattern", "edit_scores"])
def test_an_intervention_built_for_one_model_refuses_another(twins, built, used, named, build):
    src = twins[built]
    edit = {
        "attend_to_self": lambda: attend_to_self(src, layers=-1),
        "add_vector": lambda: add_vector(src, torch.ones(src.cfg.d_model), layer=-1),
        "patch_pattern": lambda: patch_pattern(src, lambda p, layer: p, layers=-1),
        "edit_scores": lambda: factlens.edit_scores(src, lambda s, layer: s, layers=-1),
    }[build]()
    target = twins[used]
    match = f"built for another model \\(.*{named}.*Build it again with this model"
    with pytest.raises(ArchitectureMismatchError, match=match), factlens.intervene(target, edit):
        target(target.to_tokens(PROMPT))


def test_layers_minus_one_on_a_deeper_model_never_edits_the_wrong_layer(twins):
    """The 2-layer model's ``layers=-1`` is layer 1; on the 3-layer model it must be refused, not run on layer 1."""
    deep = twins["gpt2-3"]
    stale = attend_to_self(twins["gpt2"], layers=-1)
    assert "blocks.1.attn.hook_attn_scores" in stale.records
    with pytest.raises(ArchitectureMismatchError), factlens.intervene(deep, stale):
        deep(deep.to_tokens(PROMPT))
    fresh = attend_to_self(deep, layers=-1)
    assert "blocks.2.attn.hook_attn_scores" in fresh.records


@settings(max_examples=6, deadline=None)
@given(n_layer=st.integers(1, 3), n_head=st.sampled_from([1, 2, 4]), other=st.integers(1, 3))
def test_an_intervention_runs_only_on_the_architecture_it_was_built_for(n_layer, n_head, other):
    a = factlens.tiny("gpt2", n_layer=n_layer, n_head=n_head, n_embd=16, n_inner=32)
    b = factlens.tiny("gpt2", n_layer=other, n_head=n_head, n_embd=16, n_inner=32, seed=1)
    edit = add_vector(a, torch.ones(16), layer=-1)
    if model_signature(a) == model_signature(b):
        with factlens.intervene(b, edit):
            b(b.to_tokens("Hi there"))
        assert edit.records[f"blocks.{other - 1}.hook_mlp_out"].changed
    else:
        with pytest.raises(ArchitectureMismatchError), factlens.intervene(b, edit):
            b(b.to_tokens("Hi there"))


# --------------------------------------------------------------------------------------- datasets and models
def test_a_dataset_of_another_tokenizer_is_refused_both_ways(twins):
    gpt2_ds, opt_ds = recall.dataset_for(twins["gpt2"]), recall.dataset_for(twins["opt"])
    with pytest.raises(TokenizationError, match=r"another tokenizer.*dataset_for\(model\)"):
        recall.run_at_end(twins["opt"], gpt2_ds)
    with pytest.raises(TokenizationError, match=r"another tokenizer.*dataset_for\(model\)"):
        recall.run_at_end(twins["gpt2"], opt_ds)
    with pytest.raises(TokenizationError, match="another tokenizer"):
        recall.logit_lens(twins["opt"], gpt2_ds)


def test_an_opt_dataset_without_its_bos_is_refused(twins):
    no_bos = opt_style_tokenizer()
    no_bos.add_bos_token = False
    ds = make_dataset(CAPITALS, no_bos)
    assert ds.n_special_prefix == 0
    with pytest.raises(TokenizationError, match=r"no BOS.*dataset_for\(model\)"):
        recall.run_at_end(twins["opt"], ds)


def test_the_binding_is_by_content_not_by_object(twins):
    """A dataset built with a fresh copy of the model's tokenizer is accepted: same vocabulary, same ids."""
    ds = make_dataset(CAPITALS, gpt2_tokenizer(), n=8)
    run = recall.run_at_end(twins["gpt2"], ds)
    assert run.logits.shape[0] == 8 and run.logits._factlens_dataset == ds.fingerprint


# ------------------------------------------------------------------------------------------ metrics and runs
@pytest.fixture(scope="module")
def two_datasets(twins):
    ds = recall.dataset_for(twins["gpt2"])
    return ds.select(range(0, 24)), ds.select(range(100, 124))


def test_a_metric_built_for_one_dataset_refuses_another(twins, two_datasets):
    a, b = two_datasets
    model = twins["gpt2"]
    metric_a = recall.metric(a, "iw")
    with pytest.raises(ConfigError, match=r"built for another dataset.*metric\(dataset, kind\)"):
        recall.path_patch(model, b, metric=metric_a, progress=False)
    with pytest.raises(ShapeError, match="another dataset"):
        metric_a(recall.run_at_end(model, b).logits)
    # the same metric on its own dataset's logits is a hand-checkable number
    logits = recall.run_at_end(model, a).logits
    manual = (logits.gather(1, a.answer_ids[:, None])[:, 0] - logits.mean(-1)).mean()
    assert float(metric_a(logits)) == pytest.approx(float(manual), rel=1e-5)


def test_full_logits_of_other_tokens_are_refused(twins):
    model = twins["gpt2"]
    ds = recall.dataset_for(model).select(range(8))
    other = make_dataset(CAPITALS, gpt2_tokenizer(), shots=1, n=8)
    with torch.no_grad():
        logits = model(other.tokens)
    assert logits.shape[1] != ds.tokens.shape[1]
    with pytest.raises(ShapeError, match="other tokens"):
        recall.metric(ds)(logits)


def test_a_shared_run_of_one_dataset_refuses_another(twins, two_datasets):
    a, b = two_datasets
    model = twins["gpt2"]
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(2)]
    run_a = recall.run_at_end(model, a, names)
    with pytest.raises(ConfigError, match=r"shared run was made (of another dataset|on other prompts)"):
        recall.logit_lens(model, b, run=run_a)
    with pytest.raises(ConfigError, match=r"(another dataset|other prompts)"):
        recall.mover_scores(model, b, run=run_a)
    recall.logit_lens(model, a, run=run_a)  # its own dataset: accepted
    with pytest.raises(ConfigError, match=r"shared run was made (of another dataset|on other prompts)"):
        recall.mitigation_table(model, shots=[0], n=30, folds=2, runs={0: run_a}, progress=False)


# ----------------------------------------------------------------------------------------- stacking edits
def test_one_intervention_in_two_nested_blocks_is_refused(twins):
    model = twins["gpt2"]
    edit = add_vector(model, torch.ones(model.cfg.d_model), layer=0)
    with factlens.intervene(model, edit):
        match = r"already applied in an enclosing intervene/mitigate block.*twice"
        with pytest.raises(ConfigError, match=match), factlens.intervene(model, edit):
            pass
        model(model.to_tokens(PROMPT))
    # released after the block: the same edit runs again
    with factlens.intervene(model, edit):
        model(model.to_tokens(PROMPT))


def test_one_intervention_twice_in_one_call_is_refused(twins):
    model = twins["gpt2"]
    edit = attend_to_self(model, layers=-1)
    with pytest.raises(ConfigError, match="twice in one call"), factlens.intervene(model, edit, edit):
        pass
    same_content = add_vector(model, torch.ones(model.cfg.d_model), layer=0)
    again = add_vector(model, torch.ones(model.cfg.d_model), layer=0)
    with pytest.raises(ConfigError, match="twice in one call"), factlens.intervene(model, same_content, again):
        pass
    hooks = [("blocks.0.hook_mlp_out", lambda t, hook: 2 * t)]
    with factlens.intervene(model, hooks):
        with pytest.raises(ConfigError, match="already applied"), factlens.intervene(model, hooks):
            pass
        model(model.to_tokens(PROMPT))


def test_nested_mitigate_is_refused_and_one_mitigate_subtracts_c_once(twins):
    model = twins["gpt2"]
    tokens = model.to_tokens(PROMPT)
    c = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    c = c - c.mean()
    with recall.mitigate(model, intercept=c, attention=False):
        with pytest.raises(ConfigError, match="already applied"), \
                recall.mitigate(model, intercept=2 * c, attention=False):
            pass
        with pytest.raises(ConfigError, match="already applied"), recall.mitigate(model, intercept=c):
            pass
        model(tokens)
    ds = recall.dataset_for(model).select(range(6))
    with recall.mitigate(model, intercept=c, attention=False):
        with pytest.raises(ConfigError, match="already applied"):
            recall.evaluate(model, ds, intercept=c)
        model(tokens)
    # one mitigation: the last MLP output at the last position is the clean one minus c, exactly once
    _, clean = model.run_with_cache(tokens, names_filter="blocks.1.hook_mlp_out")
    seen = {}
    spy = [("blocks.1.hook_mlp_out", lambda t, hook: seen.setdefault("out", t.clone()))]
    with recall.mitigate(model, intercept=c, attention=False), model.hooks(fwd_hooks=spy):
        model(tokens)
    expected = clean["blocks.1.hook_mlp_out"][0, -1] - c
    assert torch.allclose(seen["out"][0, -1], expected, atol=1e-5)


# --------------------------------------------------------------------------------- changed on the computation
def test_an_edit_the_model_does_not_consume_is_refused_on_opt(twins):
    model = twins["opt"]
    tokens = model.to_tokens(PROMPT)
    clean = model(tokens)

    def double(t, hook):  # OPT: the attention mask, from which the model does not read the positions
        return t * 2

    edit = factlens.hook("pos_embed.hook_in", double)
    with pytest.raises(InterventionNoEffectError, match=r"model's output is the same.*hook_pos_embed") as err, \
            factlens.intervene(model, edit):
        edited = model(tokens)
    assert torch.equal(edited, clean)
    assert "pos_embed.hook_in" in str(err.value)
    with factlens.intervene(model, factlens.hook("pos_embed.hook_in", double), on_no_effect="ignore") as run:
        model(tokens)
    assert run.records["pos_embed.hook_in"].changed and run.records["pos_embed.hook_in"].output_changed is False


def test_the_same_edit_on_gpt2_changes_the_output_and_passes(twins):
    model = twins["gpt2"]
    tokens = model.to_tokens(PROMPT)

    def shift(t, hook):  # GPT-2: position ids, which the model embeds
        return t.flip(-1)

    with factlens.intervene(model, factlens.hook("pos_embed.hook_in", shift)) as run:
        edited = model(tokens)
    assert run.records["pos_embed.hook_in"].output_changed is True
    assert not torch.allclose(edited, model(tokens))


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_consumed_edits_need_no_replay(twins, arch):
    model = twins[arch]
    with factlens.intervene(model, factlens.hook("blocks.0.hook_resid_pre", lambda t, hook: t * 2)) as run:
        model(model.to_tokens(PROMPT))
    assert run.records["blocks.0.hook_resid_pre"].output_changed is None  # not replayed: a consumed value


# ------------------------------------------------------------------------------------ what a hook returns
@pytest.mark.parametrize(("fn", "named"), [
    (lambda t, hook: t.double(), r"returned dtype torch\.float64 .*out\.to\(tensor\.dtype\)"),
    (lambda t, hook: t[:, :-1], r"returned shape .* same shape"),
    (lambda t, hook: t * float("nan"), "wrote NaN"),
    (lambda t, hook: t.sum(-1), r"returned shape"),
])
@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_a_hook_returning_what_the_model_cannot_take_is_refused(twins, arch, fn, named):
    model = twins[arch]
    with pytest.raises(ShapeError, match=named), factlens.intervene(model, factlens.hook("blocks.0.hook_mlp_out", fn)):
        model(model.to_tokens(PROMPT))


@pytest.mark.parametrize("hook_name", ["blocks.0.attn.hook_z", "blocks.1.attn.hook_q", "blocks.0.mlp.hook_post",
                                       "blocks.0.attn.hook_pattern"])
def test_add_vector_on_a_hook_that_is_not_residual_width_names_the_fix(twins, hook_name):
    model = twins["gpt2"]
    with pytest.raises(ShapeError, match=r"is not one .*hook_resid_pre/mid/post.*factlens\.hook"):
        add_vector(model, torch.ones(model.cfg.d_model), hook_name=hook_name)


@pytest.mark.parametrize(("names_filter", "named"), [
    (lambda name: name.endswith("hook_zz"), "matches no hook point"),
    (["blocks.0.attn.hook_z", "blocks.7.attn.hook_z"], r"\['blocks\.7\.attn\.hook_z'\]"),
    ("blocks.0.attn.hook_patern", "not hook points"),
    ([], "is empty"),
])
def test_cache_filters_that_miss_are_refused(twins, names_filter, named):
    model = twins["gpt2"]
    with pytest.raises(HookDidNotFireError, match=named):
        factlens.run_with_cache(model, model.to_tokens(PROMPT), names_filter=names_filter)
