"""The intervention layer: patterns, scores and vectors take effect on GPT-2 and OPT, and prove it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformer_lens import patching

import factlens
from factlens import add_vector, attend_to_self, hook, intervene, patch_pattern


def uniform_pattern(model, tokens):
    p = tokens.shape[1]
    causal = torch.tril(torch.ones(p, p))
    return (causal / causal.sum(-1, keepdim=True)).expand(tokens.shape[0], model.cfg.n_heads, p, p).clone()


def test_own_pattern_patch_is_identity(model, tokens):
    base, cache = model.run_with_cache(tokens)
    with intervene(model, patch_pattern(model, cache), on_no_effect="ignore") as run:
        out = model(tokens)
    torch.testing.assert_close(out, base, atol=1e-5, rtol=0)
    assert all(r.calls == 1 for r in run.records.values())
    assert len(run.records) == model.cfg.n_layers


def test_own_pattern_patch_raises_without_opt_out(model, tokens):
    _, cache = model.run_with_cache(tokens)
    with pytest.raises(factlens.InterventionNoEffectError, match="on_no_effect='ignore'"), \
            intervene(model, patch_pattern(model, cache)):
        model(tokens)


def test_uniform_pattern_changes_logits(model, tokens):
    base = model(tokens)
    with intervene(model, patch_pattern(model, uniform_pattern(model, tokens))) as run:
        out = model(tokens)
    assert (out - base).abs().max() > 1e-4
    assert all(r.changed for r in run.records.values())


def test_pattern_patch_matches_tl_patching(model, tokens):
    """Golden reference: TL's own pattern-patching sweep (which is a no-op on stock OPT) agrees with ours."""
    other = model.to_tokens(["The capital of Spain is", "Keep in mind, the capital of Italy is"])
    assert other.shape == tokens.shape
    _, clean_cache = model.run_with_cache(other)

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, 6342].mean()

    tl = patching.get_act_patch_attn_head_pattern_all_pos(model, tokens, clean_cache, metric)
    for layer in range(model.cfg.n_layers):
        for head in (0, model.cfg.n_heads - 1):
            with intervene(model, patch_pattern(model, clean_cache, layers=layer, heads=[head])):
                ours = metric(model(tokens))
            assert abs(float(ours) - float(tl[layer, head])) < 1e-5
    baseline = metric(model(tokens))
    assert (tl - baseline).abs().max() > 1e-6, "TL's own hook_pattern sweep must take effect (OPT too)"


def test_attend_to_self_only_changes_last_position(model, tokens):
    base, cache = model.run_with_cache(tokens)
    last = model.cfg.n_layers - 1
    with intervene(model, attend_to_self(model, layers=-1, positions=-1)):
        out, edited = model.run_with_cache(tokens)
    assert (out[:, -1] - base[:, -1]).abs().max() > 1e-4
    torch.testing.assert_close(out[:, :-1], base[:, :-1], atol=1e-6, rtol=0)
    torch.testing.assert_close(edited[f"blocks.{last}.hook_resid_pre"], cache[f"blocks.{last}.hook_resid_pre"])
    pattern = edited[f"blocks.{last}.attn.hook_pattern"][:, :, -1]  # [b, h, k]
    assert torch.allclose(pattern[..., -1], torch.ones_like(pattern[..., -1]))


def test_attend_to_self_per_prompt_positions(model):
    tokens = model.to_tokens(["The capital of France is", "Keep in mind, the capital of Japan is"])
    lengths = (tokens != model.tokenizer.pad_token_id).sum(-1) - 1
    base = model(tokens)
    with intervene(model, attend_to_self(model, positions=lengths)):
        out = model(tokens)
    changed = (out - base).abs().amax(-1) > 1e-6  # [b, p]
    expected = torch.zeros_like(changed)
    expected[torch.arange(len(lengths)), lengths] = True
    assert torch.equal(changed, expected)


def test_empty_head_list_and_zero_vector_are_identity(model, tokens):
    base = model(tokens)
    edits = [attend_to_self(model, heads=[]), patch_pattern(model, uniform_pattern(model, tokens), heads=[]),
             add_vector(model, torch.zeros(model.cfg.d_model))]
    assert all(e.identity for e in edits)
    with intervene(model, *edits):
        out = model(tokens)
    torch.testing.assert_close(out, base)


def test_add_vector_equals_residual_shift(model, tokens):
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    last = model.cfg.n_layers - 1
    with intervene(model, add_vector(model, vector, layer=-1, component="mlp_out", positions=-1)):
        a = model(tokens)
    with intervene(model, add_vector(model, vector, hook_name=f"blocks.{last}.hook_resid_post", positions=-1)):
        b = model(tokens)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_hook_that_never_fires_raises(model, tokens):
    with pytest.raises(factlens.HookDidNotFireError, match="never fired"), \
            intervene(model, hook("blocks.1.hook_mlp_out", lambda t, h: t + 1)):
        model(tokens, stop_at_layer=1)
    with pytest.raises(factlens.HookDidNotFireError, match="Closest names"), \
            intervene(model, hook("blocks.0.attn.hook_patern", lambda t, h: t)):
        model(tokens)


def test_bad_inputs(model, tokens):
    with pytest.raises(factlens.ConfigError, match="out of range"):
        attend_to_self(model, layers=model.cfg.n_layers)
    with pytest.raises(factlens.ConfigError, match="head"):
        patch_pattern(model, uniform_pattern(model, tokens), heads=[model.cfg.n_heads])
    bad = uniform_pattern(model, tokens) * 2
    with pytest.raises(factlens.ShapeError, match="sum to 1"), intervene(model, patch_pattern(model, bad)):
        model(tokens)
    wrong = uniform_pattern(model, tokens)[:, :, :-1, :-1]
    with pytest.raises(factlens.ShapeError, match="shape"), intervene(model, patch_pattern(model, wrong)):
        model(tokens)
    nan = uniform_pattern(model, tokens)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(factlens.ShapeError, match="NaN"), intervene(model, patch_pattern(model, nan)):
        model(tokens)
    with pytest.raises(factlens.ShapeError, match="d_model"):
        add_vector(model, torch.ones(3))


def test_stop_gradient_in_train_mode(arch):
    model = factlens.tiny(arch, seed=5)
    model.train()
    tokens = model.to_tokens(["The capital of France is", "Keep in mind, the capital of Japan is"])
    _, cache = model.run_with_cache(tokens)
    with intervene(model, patch_pattern(model, cache), on_no_effect="ignore"):
        loss = model(tokens, return_type="loss")
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    qk = [n for n in grads if any(s in n for s in ("attn.q.", "attn.k.", "q_proj", "k_proj"))]
    vo = [n for n in grads if any(s in n for s in ("attn.v.", "attn.o.", "v_proj", "out_proj"))]
    mlp = [n for n in grads if any(s in n for s in ("mlp", "fc1", "fc2"))]
    assert qk and vo and mlp
    assert all(grads[n] is None or not grads[n].any() for n in qk)
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in vo + mlp)


def draw_setup(tiny_models, data, first_position: int):
    """A random tiny model (GPT-2 or OPT) in eval mode, two prompts, and a random layer, heads and position."""
    model = tiny_models[data.draw(st.sampled_from(["gpt2", "opt"]))]
    model.eval()
    tokens = model.to_tokens(["The capital of France is", "Keep in mind, the capital of Japan is"])
    layer = data.draw(st.integers(0, model.cfg.n_layers - 1))
    heads = data.draw(st.lists(st.integers(0, model.cfg.n_heads - 1), min_size=1, max_size=3, unique=True))
    position = data.draw(st.integers(first_position, tokens.shape[1] - 1))
    return model, tokens, layer, heads, position


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_interventions_change_output_only_when_they_should(tiny_models, data):
    model, tokens, layer, heads, position = draw_setup(tiny_models, data, first_position=1)
    base = model(tokens)
    for edit in (attend_to_self(model, layers=layer, heads=heads, positions=position),
                 patch_pattern(model, uniform_pattern(model, tokens), layers=layer, heads=heads, positions=position),
                 add_vector(model, torch.ones(model.cfg.d_model) + torch.arange(model.cfg.d_model) / 10,
                            layer=layer, positions=position)):
        with intervene(model, edit):
            out = model(tokens)
        delta = (out - base).abs().amax(-1)  # [b, p]
        assert delta[:, position:].max() > 0
        # causal: earlier positions never change (to float rounding: an unedited OPT layer runs SDPA, an edited
        # one the explicit softmax)
        assert delta[:, :position].max() <= 1e-5


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_identity_edits_change_nothing_and_say_so(tiny_models, data):
    """Every public intervention, made the identity, leaves the output bit-identical. An identity by accident
    (an edit whose hooks ran but changed nothing) raises under the default ``on_no_effect="raise"``; an
    identity by construction (zero vector, ``coeff=0``, no heads, c = 0) installs no hook and says so."""
    model, tokens, layer, heads, position = draw_setup(tiny_models, data, first_position=0)
    base = model(tokens)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    by_accident = {
        "own pattern": lambda: patch_pattern(model, cache, layers=layer, heads=heads, positions=position),
        "scores unchanged": lambda: factlens.edit_scores(model, lambda s, layer: s.clone(), layers=layer),
        "attend to self at query 0": lambda: attend_to_self(model, layers=layer, heads=heads, positions=0),
        "identity hook": lambda: hook(f"blocks.{layer}.hook_resid_post", lambda t, hook: t),
    }
    by_construction = {
        "zero vector": lambda: add_vector(model, torch.zeros(model.cfg.d_model), layer=layer, positions=position),
        "zero coefficient": lambda: add_vector(model, torch.ones(model.cfg.d_model), layer=layer, coeff=0.0),
        "no heads": lambda: attend_to_self(model, layers=layer, heads=[], positions=position),
        "no pattern heads": lambda: patch_pattern(model, cache, layers=layer, heads=[]),
    }
    name = data.draw(st.sampled_from(sorted(by_accident) + sorted(by_construction)))
    edit = {**by_accident, **by_construction}[name]()
    with intervene(model, edit, on_no_effect="ignore") as run:
        out = model(tokens)
    if factlens.models.family_of(model) == "opt" and name in by_accident:  # an unedited OPT layer runs SDPA, a
        torch.testing.assert_close(out, base, rtol=0, atol=1e-5)          # hooked one the explicit softmax
    else:
        assert torch.equal(out, base), name
    if name in by_accident:
        assert run.records and all(rec.calls > 0 and not rec.changed for rec in run.records.values()), name
        with pytest.raises(factlens.InterventionNoEffectError), intervene(model, edit):
            model(tokens)
    else:
        assert edit.identity and not run.records, name
        with intervene(model, edit):  # no hooks, nothing to verify
            assert torch.equal(model(tokens), base)
    # mitigation (b) with c = 0 through the context manager: the identity by construction
    with factlens.mitigate(model, intercept=torch.zeros(model.cfg.d_model), attention=False) as run:
        assert torch.equal(model(tokens), base)
    assert not run.records


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_edits_whose_hooks_cannot_fire_raise(tiny_models, data):
    arch = data.draw(st.sampled_from(["gpt2", "opt"]))
    model = tiny_models[arch]
    model.eval()
    tokens = model.to_tokens("The capital of France is")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    bad_layer = data.draw(st.integers(L, L + 5) | st.integers(-L - 5, -L - 1))
    bad_head = data.draw(st.integers(H, H + 5))
    with pytest.raises(factlens.ConfigError, match="out of range"):
        attend_to_self(model, layers=bad_layer)
    with pytest.raises(factlens.ConfigError, match="out of range"):
        attend_to_self(model, layers=0, heads=[bad_head])
    with pytest.raises(factlens.ConfigError, match="out of range"):
        add_vector(model, torch.ones(model.cfg.d_model), layer=bad_layer)
    # a real hook point that the forward pass never reaches (the run stops before its layer)
    layer = data.draw(st.integers(1, L - 1))
    edit = hook(f"blocks.{layer}.hook_mlp_out", lambda t, hook: t + 1)
    with pytest.raises(factlens.HookDidNotFireError, match="never fired"), intervene(model, edit):
        model(tokens, stop_at_layer=layer)


def test_attention_pattern_viewer(model):
    from factlens.plot import attention_patterns

    fig = attention_patterns(model, "The capital of France is", heads=[(0, 1), (-1, -1)])
    assert len(fig.data) == 2 and fig.layout.title.text == "Attention patterns"
    heat = fig.data[0]
    assert heat.z.shape[0] == heat.z.shape[1] == len(heat.x)
    assert all(abs(row.sum() - 1) < 1e-5 for row in heat.z)  # post-softmax rows
    assert " France" in "".join(heat.x)  # token labels


# ------------------------------------------------------------------------- TL idioms and per-hook verification
def _zero_head0_inplace(z, hook):  # TL's in-place idiom, returning the tensor
    z[:, :, 0] = 0.0
    return z


def _zero_head0_none(z, hook):  # ... or returning None
    z[:, :, 0] = 0.0


def _zero_head0_copy(z, hook):
    out = z.clone()
    out[:, :, 0] = 0.0
    return out


def test_inplace_hooks_count_as_changes(model, tokens):
    """Issue 15 §2: the standard TL hook edits in place; it must not raise InterventionNoEffectError."""
    base = model(tokens)
    outs = []
    for fn in (_zero_head0_inplace, _zero_head0_none, _zero_head0_copy):
        with intervene(model, hook("blocks.0.attn.hook_z", fn)) as run:
            outs.append(model(tokens))
        rec = run.records["blocks.0.attn.hook_z"]
        assert rec.calls == 1 and rec.changed and 0 < rec.max_abs_change < 1e3
    assert (outs[0] - base).abs().max() > 1e-4
    torch.testing.assert_close(outs[0], outs[2])
    torch.testing.assert_close(outs[1], outs[2])


def test_tl_style_hook_lists_match_run_with_hooks(model, tokens):
    """``[(name, fn), ...]`` (names or filters) behave as in TL's own ``run_with_hooks`` (golden reference)."""
    hooks = [("blocks.0.hook_mlp_out", lambda t, hook: 1.5 * t),
             (lambda name: name == "blocks.1.attn.hook_z", _zero_head0_copy)]
    golden = model.run_with_hooks(tokens, fwd_hooks=hooks)
    with intervene(model, hooks) as run:
        ours = model(tokens)
    torch.testing.assert_close(ours, golden)
    assert set(run.records) == {"blocks.0.hook_mlp_out", "blocks.1.attn.hook_z"}
    torch.testing.assert_close(factlens.run_with_interventions(model, tokens, fwd_hooks=hooks), golden)
    torch.testing.assert_close(factlens.run_with_interventions(model, tokens, hooks[0], hooks[1]), golden)


def test_records_to_dataframe_report_real_sizes(model, tokens):
    """Issue 15 §2: max_abs_change is a real size, never the mask fill value (3.4e38)."""
    vector = torch.arange(model.cfg.d_model, dtype=torch.float32) / 10
    with intervene(model, attend_to_self(model), add_vector(model, vector, positions=-1)) as run:
        model(tokens)
    df = run.records.to_dataframe()
    assert list(df["hook"]) == [f"blocks.{model.cfg.n_layers - 1}.attn.hook_attn_scores",
                                f"blocks.{model.cfg.n_layers - 1}.hook_mlp_out"]
    scores, mlp = run.records[df["hook"][0]], run.records[df["hook"][1]]
    assert scores.n_masked == scores.n_changed > 0 and scores.max_abs_change == 0.0  # masking only
    # the vector is added at the last position of both prompts: its largest entry is the largest change
    assert mlp.n_masked == 0 and abs(mlp.max_abs_change - float(vector.abs().max())) < 1e-4
    assert df["max_abs_change"].max() < 1e3
    assert "1 call(s), changed, max |Δ| " in repr(run.records) and "<table" in run.records._repr_html_()


@pytest.mark.usefixtures("unchecked")  # on_no_effect typos on purpose: factlens's own ConfigError
def test_each_hook_is_checked(model, tokens):
    """Issue 14 §5: a two-hook intervention in which one hook changes nothing names that hook."""
    iv = hook("blocks.0.hook_mlp_out", lambda t, h: t * 2)
    iv.add("blocks.1.hook_mlp_out", lambda t, h: t)
    with pytest.raises(factlens.InterventionNoEffectError, match=r"1 of its 2 hooks.*blocks\.1\.hook_mlp_out"), \
            intervene(model, iv):
        model(tokens)
    with pytest.warns(UserWarning, match="blocks.1.hook_mlp_out"), intervene(model, iv, on_no_effect="warn"):
        model(tokens)
    with intervene(model, iv, on_no_effect="ignore") as run:
        model(tokens)
    assert [r.changed for r in run.records.values()] == [True, False]
    for typo in ("rasie", "Raise", None):
        with pytest.raises(factlens.ConfigError, match="'raise', 'warn', 'ignore'"), \
                intervene(model, iv, on_no_effect=typo):
            pass


def test_nested_interventions_on_one_hook_compose(model, tokens):
    with intervene(model, hook("blocks.0.hook_mlp_out", lambda t, h: t + 1)) as outer, \
            intervene(model, hook("blocks.0.hook_mlp_out", lambda t, h: 2 * t)) as inner:
        nested = model(tokens)
    golden = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", lambda t, hook: t + 1),
                                                     ("blocks.0.hook_mlp_out", lambda t, hook: 2 * t)])
    torch.testing.assert_close(nested, golden)
    assert outer.records["blocks.0.hook_mlp_out"].calls == inner.records["blocks.0.hook_mlp_out"].calls == 1


def test_a_hook_that_raises_leaves_the_model_clean(model, tokens):
    base = model(tokens)
    installed = {n: len(hp._forward_hooks) for n, hp in model.hook_dict.items()}  # TL's own (OPT has some)

    def boom(t, hook):
        raise KeyError("user bug")

    with pytest.raises(KeyError, match="user bug"), intervene(model, hook("blocks.0.hook_mlp_out", boom)):
        model(tokens)
    assert {n: len(hp._forward_hooks) for n, hp in model.hook_dict.items()} == installed
    torch.testing.assert_close(model(tokens), base)


# ------------------------------------------------------------------------------------------ pattern checks
def test_patterns_must_be_causal_nonnegative_and_normalised(model, tokens):
    """Issue 14 §4: weight on future keys and negative weights (rows still summing to 1) are refused."""
    p = tokens.shape[1]
    future = torch.full((tokens.shape[0], model.cfg.n_heads, p, p), 1 / p)  # uniform over every key
    with pytest.raises(factlens.ShapeError, match="future key"), intervene(model, patch_pattern(model, future)):
        model(tokens)
    with intervene(model, patch_pattern(model, future, causal=False)) as run:  # said explicitly: allowed
        model(tokens)
    assert all(r.changed for r in run.records.values())
    negative = uniform_pattern(model, tokens)
    negative[..., -1, 0] += 0.5
    negative[..., -1, 1] -= 0.5
    assert torch.allclose(negative.sum(-1), torch.ones(()))
    with pytest.raises(factlens.ShapeError, match="negative"), intervene(model, patch_pattern(model, negative)):
        model(tokens)
    # only the rows that are patched in are checked: a bad row elsewhere does not matter
    with intervene(model, patch_pattern(model, negative, positions=1)):
        model(tokens)


def test_pattern_row_sum_tolerance_follows_the_dtype(model, tokens):
    off = uniform_pattern(model, tokens) * (1 + 5e-3)  # rows sum to 1.005
    with pytest.raises(factlens.ShapeError, match="sum to 1"), intervene(model, patch_pattern(model, off)):
        model(tokens)
    with intervene(model, patch_pattern(model, off.to(torch.bfloat16))):  # bf16 rounding: accepted
        model(tokens)


def test_score_edit_closing_a_row_is_an_error_not_a_change(model, tokens):
    def close_last_row(scores, layer):
        out = scores.clone()
        out[:, :, -1, :] = float("-inf")
        return out

    with pytest.raises(factlens.ShapeError, match="at least one key open"), \
            intervene(model, factlens.edit_scores(model, close_last_row, layers=0)):
        model(tokens)


def test_per_prompt_positions_on_a_right_padded_batch_equal_single_prompts(model):
    """The edit at each prompt's own last token equals the same edit on that prompt alone."""
    prompts = ["The capital of France is", "Keep in mind, the capital of Japan is"]
    tokens = model.to_tokens(prompts)  # right-padded
    ends = torch.tensor([model.to_tokens(p).shape[1] - 1 for p in prompts])
    with intervene(model, attend_to_self(model, positions=ends)):
        batched = model(tokens)
    for i, prompt in enumerate(prompts):
        with intervene(model, attend_to_self(model, positions=-1)):
            single = model(model.to_tokens(prompt))
        torch.testing.assert_close(batched[i, ends[i]], single[0, -1], atol=1e-4, rtol=1e-4)
