"""Bad-input catalogue, part 2: indices, interventions, patterns, generation, model inputs and caches.

Each case raises a specific factlens error whose message names the fix (as in ``test_bad_inputs.py``);
docs/reliability.md lists every case with the message factlens prints (``python tests/test_bad_inputs_hooks.py``
prints the rows). The cases of issue 14's root causes 3, 4, 5, 9 and 10 come first, then a red team of our own.
"""

from __future__ import annotations

import pytest
import torch

import factlens
from factlens.bios.patching.training import AttentionPatcher
from factlens.inputs import check_device, resolve_dtype
from factlens.recall.datasets import make_prompt_dataset
from factlens.recall.mitigation import interventions_for
from factlens.recall.mlp_decomposition import capture_mlp_activations
from factlens.tokenizers import gpt2_tokenizer

pytestmark = pytest.mark.usefixtures("unchecked")  # wrong arguments on purpose: factlens's own errors


@pytest.fixture(scope="module")
def gpt2():
    return factlens.tiny("gpt2")


@pytest.fixture(scope="module")
def toks(gpt2):
    return gpt2.to_tokens("The capital of France is")  # [1, 6]


def uniform(model, tokens):
    p = tokens.shape[1]
    causal = torch.tril(torch.ones(p, p))
    return (causal / causal.sum(-1, keepdim=True)).expand(tokens.shape[0], model.cfg.n_heads, p, p).clone()


def _run(model, tokens, *interventions, **kwargs):
    with factlens.intervene(model, *interventions, **kwargs):
        model(tokens)


def _batch(model, n):
    return model.to_tokens(["The capital of France is", "Keep in mind, the capital of Japan is",
                            "We confirm that the capital of Italy is"][:n])


def _future_pattern(model, tokens):
    p = uniform(model, tokens)
    p[..., 0, :] = 1 / p.shape[-1]  # query 0 spreads over every key, future ones included (rows still sum to 1)
    return p


def _negative_pattern(model, tokens):
    p = uniform(model, tokens)
    p[..., -1, 0] += 0.5
    p[..., -1, 1] -= 0.5  # rows still sum to 1
    return p


def _mask_all(scores, layer):
    return torch.full_like(scores, float("-inf"))


def _two_hooks_one_idle(model):
    iv = factlens.hook("blocks.0.hook_mlp_out", lambda t, h: t * 2)
    iv.add("blocks.1.hook_mlp_out", lambda t, h: t)
    return iv


def _decode_with_prompt_positions(model, toks):
    ends = torch.tensor([toks.shape[1] - 1])  # a per-prompt position, valid for the prompt only
    with factlens.intervene(model, factlens.attend_to_self(model, positions=ends)):
        model.generate(toks, max_new_tokens=2, do_sample=False, verbose=False)


def _dataset(subject_prompt):
    return make_prompt_dataset([subject_prompt], gpt2_tokenizer(), first_piece=True)


CASES = {
    # issue 14, root cause 3: indices never wrap -------------------------------------------------------------
    "positions past the sequence (per prompt)": (
        lambda m, t: _run(m, _batch(m, 2), factlens.attend_to_self(m, positions=torch.tensor([99, 7]))),
        factlens.ConfigError, "-1 to count from the end"),
    "per-prompt positions for another batch size": (
        lambda m, t: _run(m, _batch(m, 3), factlens.attend_to_self(m, positions=torch.tensor([4, 5]))),
        factlens.ConfigError, "one position per prompt"),
    "regressor layer past the model": (
        lambda m, t: capture_mlp_activations(m, factlens.recall.dataset_for(m).select(range(2)), -1,
                                             regressors=[(5, 0)]),
        factlens.ConfigError, "0..1"),
    # root cause 4: patterns ----------------------------------------------------------------------------------
    "pattern with weight on future keys": (
        lambda m, t: _run(m, t, factlens.patch_pattern(m, _future_pattern(m, t))), factlens.ShapeError, "causal=False"),
    "pattern with negative weights": (
        lambda m, t: _run(m, t, factlens.patch_pattern(m, _negative_pattern(m, t))), factlens.ShapeError,
        "post-softmax pattern"),
    "score edit masking every key": (
        lambda m, t: _run(m, t, factlens.edit_scores(m, _mask_all, layers=0)), factlens.ShapeError,
        "at least one key open"),
    # root cause 5: each hook, and option values ----------------------------------------------------------------
    "one of two hooks changes nothing": (
        lambda m, t: _run(m, t, _two_hooks_one_idle(m)), factlens.InterventionNoEffectError, "blocks.1.hook_mlp_out"),
    "misspelt on_no_effect": (
        lambda m, t: _run(m, t, factlens.attend_to_self(m), on_no_effect="rasie"), factlens.ConfigError,
        "did you mean 'raise'"),
    # root cause 9 and 10 --------------------------------------------------------------------------------------
    "device that does not exist": (lambda m, t: factlens.tiny("gpt2", device="cdua"), factlens.ConfigError, "'cpu'"),
    "dtype name factlens does not know": (lambda m, t: factlens.build_hf("gpt2", dtype="float8"), factlens.ConfigError,
                                          "'bf16'"),
    "n_head not dividing d_model": (lambda m, t: factlens.tiny("gpt2", n_head=5), factlens.ConfigError, "pick n_head"),
    "sequence longer than the context": (
        lambda m, t: m(torch.zeros(1, m.cfg.n_ctx + 1, dtype=torch.long)), factlens.ShapeError, "truncate"),
    "token id past the vocabulary": (
        lambda m, t: m(torch.tensor([[1, m.cfg.d_vocab + 7]])), factlens.ShapeError, "model.to_tokens"),
    "generating past the context": (
        lambda m, t: m.generate(t, max_new_tokens=m.cfg.n_ctx, do_sample=False, verbose=False), factlens.ShapeError,
        "max_new_tokens"),
    # red team: indices ----------------------------------------------------------------------------------------
    "head given as a float": (lambda m, t: factlens.attend_to_self(m, heads=[1.0]), factlens.ConfigError, "int(x)"),
    "head given as True": (lambda m, t: factlens.attend_to_self(m, heads=True), factlens.ConfigError, "[0, 2]"),
    "heads given as a boolean mask": (
        lambda m, t: factlens.patch_pattern(m, uniform(m, t), heads=torch.tensor([True, False, True, False])),
        factlens.ConfigError, "torch.nonzero"),
    "layer given as a string": (lambda m, t: factlens.attend_to_self(m, layers="1"), factlens.ConfigError,
                                "pass an int"),
    "the same layer twice (1 and -1)": (lambda m, t: factlens.attend_to_self(m, layers=[1, -1]), factlens.ConfigError,
                                        "each layer once"),
    "the same head twice": (lambda m, t: factlens.attend_to_self(m, heads=[2, 2]), factlens.ConfigError,
                            "each head once"),
    "positions as a 2-d tensor": (
        lambda m, t: _run(m, t, factlens.attend_to_self(m, positions=torch.tensor([[5]]))), factlens.ConfigError,
        "1-d tensor"),
    "positions as a float tensor": (
        lambda m, t: _run(m, t, factlens.attend_to_self(m, positions=torch.tensor([5.0]))), factlens.ConfigError,
        "int(x)"),
    "the same position twice": (
        lambda m, t: _run(m, t, factlens.attend_to_self(m, positions=[5, -1])), factlens.ConfigError,
        "each position once"),
    "prompt positions during cached generation": (
        _decode_with_prompt_positions, factlens.ConfigError, "positions=-1"),
    "add_vector at a list of layers": (
        lambda m, t: factlens.add_vector(m, torch.ones(m.cfg.d_model), layer=[0, 1]), factlens.ConfigError,
        "pass an int"),
    "mitigation at a layer past the model": (
        lambda m, t: interventions_for(m, layer=5), factlens.ConfigError, "0..1"),
    "regressor head past the layer's heads": (
        lambda m, t: capture_mlp_activations(m, factlens.recall.dataset_for(m).select(range(2)), -1,
                                             regressors=[(0, 9)]),
        factlens.ConfigError, "0..3"),
    "the same regressor twice": (
        lambda m, t: capture_mlp_activations(m, factlens.recall.dataset_for(m).select(range(2)), -1,
                                             regressors=[(0, 1), (-2, 1)]),
        factlens.ConfigError, "each (layer, head) once"),
    "regressor that is not a pair": (
        lambda m, t: capture_mlp_activations(m, factlens.recall.dataset_for(m).select(range(2)), -1,
                                             regressors=[(1,)]),
        factlens.ConfigError, "regressors=[(11, 0)"),
    "training-time patching of a layer past the model": (
        lambda m, t: AttentionPatcher(factlens.build_hf("gpt2"), factlens.build_hf("gpt2", seed=1), layers=[2]),
        factlens.ConfigError, "0..1"),
    # red team: interventions and hooks ---------------------------------------------------------------------------
    "score edit writing NaN": (
        lambda m, t: _run(m, t, factlens.edit_scores(m, lambda s, layer: s * float("nan"), layers=0)),
        factlens.ShapeError, "never NaN"),
    "score edit of the wrong shape": (
        lambda m, t: _run(m, t, factlens.edit_scores(m, lambda s, layer: s[..., :-1], layers=0)), factlens.ShapeError,
        "same shape"),
    "hook returning a number": (
        lambda m, t: _run(m, t, factlens.hook("blocks.0.hook_mlp_out", lambda x, h: 0.0)), factlens.ShapeError,
        "returns the (edited) tensor"),
    "pattern source without the layer": (
        lambda m, t: _run(m, t, factlens.patch_pattern(m, {0: uniform(m, t)})), factlens.ShapeError,
        "for every patched layer"),
    "intervene given a string": (
        lambda m, t: _run(m, t, "blocks.0.hook_mlp_out"), factlens.ConfigError, "[(hook_name, fn), ...]"),
    "TL hook filter matching nothing": (
        lambda m, t: _run(m, t, [(lambda name: name.endswith("hook_nothing"), lambda x, h: x + 1)]),
        factlens.HookDidNotFireError, "model.hook_dict"),
    "add_vector with a Python list": (
        lambda m, t: factlens.add_vector(m, [1.0] * m.cfg.d_model), factlens.ShapeError, "torch.tensor("),
    "per-prompt vector for another batch": (
        lambda m, t: _run(m, _batch(m, 2), factlens.add_vector(m, torch.ones(3, m.cfg.d_model))),
        factlens.ShapeError, "one row per prompt"),
    # red team: models, inputs, caches, datasets --------------------------------------------------------------------
    "integer dtype for weights": (lambda m, t: resolve_dtype(torch.int64), factlens.ConfigError, "floating-point"),
    "CUDA index without CUDA": (lambda m, t: check_device("cuda:1"), factlens.ConfigError, "device='cpu'"),
    "model with no layers": (lambda m, t: factlens.build_hf("gpt2", n_layer=0), factlens.ConfigError, "n_layer >= 1"),
    "negative token id": (lambda m, t: m(torch.tensor([[3, -1]])), factlens.ShapeError, "model.to_tokens"),
    "pos_slice past the sequence": (
        lambda m, t: factlens.run_with_cache(m, t, pos_slice=[10]), factlens.ConfigError, "-6..-1"),
    "pos_slice that is not a selection": (
        lambda m, t: factlens.run_with_cache(m, t, pos_slice="last"), factlens.ConfigError, "slice(-3, None)"),
    "subject only inside a longer word": (
        lambda m, t: _dataset(("Unlike Nigeria, the capital is", "Niger", "Niamey")), factlens.TokenizationError,
        "whole word"),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA cases only apply to machines without a GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, gpt2, toks):
    fn, error, fix = CASES[case]
    gpt2.reset_hooks()
    with pytest.raises(error) as info:
        fn(gpt2, toks)
    assert fix in str(info.value), f"{case}: the message does not name the fix: {info.value}"
    assert isinstance(info.value, factlens.FactlensError)
    assert not any(hp._forward_hooks for hp in gpt2.hook_dict.values()), f"{case}: a hook was left installed"


def test_docs_list_every_case():
    """docs/reliability.md's catalogue has a row for every case here (keep the two in step)."""
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    missing = [case for case in CASES if f"| {case} |" not in doc]
    assert not missing, f"add these rows to docs/reliability.md: {missing}"


if __name__ == "__main__":  # print the catalogue rows for docs/reliability.md
    import warnings

    warnings.simplefilter("ignore")
    model = factlens.tiny("gpt2")
    tokens = model.to_tokens("The capital of France is")
    for name, (fn, error, _) in CASES.items():
        model.reset_hooks()
        try:
            fn(model, tokens)
            message = "NO ERROR"
        except factlens.FactlensError as err:
            message = str(err).replace("|", "\\|").replace("\n", " ")
        print(f"| {name} | `{error.__name__}` | {message} |")
