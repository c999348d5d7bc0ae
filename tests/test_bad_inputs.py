"""The bad-input catalogue: each case raises a specific factlens error whose message names the fix.

docs/reliability.md lists the same catalogue (input → error → fix).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import factlens
from factlens import capitals
from factlens.attention_patcher import AttentionPatcher
from factlens.bios.data.samplers import Celebrities, PowerLaw, Sequential, WarmUp
from factlens.bios.metrics import plateau_end
from factlens.bios.trainer import TrainConfig, Trainer
from factlens.checkpoints import load_checkpoint, save_checkpoint
from factlens.recall.datasets import make_dataset, make_prompt_dataset
from factlens.recall.decompose import fit_decomposition
from factlens.recall.relations import CAPITALS, make_relation
from factlens.resources import set_memory_budget
from factlens.tokenizers import gpt2_tokenizer


@pytest.fixture(scope="module")
def gpt2():
    return factlens.tiny("gpt2")


@pytest.fixture(scope="module")
def toks(gpt2):
    return gpt2.to_tokens("The capital of France is")


def uniform(model, tokens):
    p = tokens.shape[1]
    causal = torch.tril(torch.ones(p, p))
    return (causal / causal.sum(-1, keepdim=True)).expand(tokens.shape[0], model.cfg.n_heads, p, p).clone()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return save_checkpoint(root, factlens.build_hf("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=50), step=3)


def corrupt_copy(checkpoint, tmp_path, edit):
    target = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, target)
    edit(target)
    return target


def in_train_mode(model, fn):
    model.train()
    try:
        return fn()
    finally:
        model.eval()


def with_budget(budget, fn):
    set_memory_budget(budget)
    try:
        return fn()
    finally:
        set_memory_budget(None)


def few_prompts(model, n=4):
    return capitals.dataset_for(model).select(range(n))


CASES = {
    # models ------------------------------------------------------------------------------------------
    "unknown model name": (lambda gpt2, toks: factlens.load("gpt5"), factlens.UnknownModelError, "Supported"),
    "unknown tiny architecture": (lambda gpt2, toks: factlens.tiny("llama"), factlens.UnknownModelError, "'gpt2' or 'opt'"),
    # relation datasets ---------------------------------------------------------------------------------
    "answer not a single token": (
        lambda gpt2, toks: make_dataset(make_relation("c", {"Burkina Faso": "Ouagadougou"}, "The capital of {subject} is"),
                                        gpt2_tokenizer()), factlens.TokenizationError, "first_piece"),
    "template without the subject": (
        lambda gpt2, toks: make_relation("c", {"France": "Paris"}, "The capital is"), factlens.TokenizationError, "{subject}"),
    "prompt missing its subject": (
        lambda gpt2, toks: make_prompt_dataset([("Alice was born in", "Bob", "Paris")], gpt2_tokenizer()),
        factlens.TokenizationError, "include it"),
    "empty prompt list": (lambda gpt2, toks: make_prompt_dataset([], gpt2_tokenizer()), factlens.EmptyDatasetError, "at least one"),
    "shots > available countries": (lambda gpt2, toks: make_dataset(CAPITALS, gpt2_tokenizer(), shots=15),
                                     factlens.ConfigError, "other"),
    # interventions -------------------------------------------------------------------------------------
    "layer index out of range": (lambda gpt2, toks: factlens.attend_to_self(gpt2, layers=7), factlens.ConfigError, "0..1"),
    "head index out of range": (lambda gpt2, toks: factlens.attend_to_self(gpt2, heads=[9]), factlens.ConfigError, "0..3"),
    "hook name that does not exist": (
        lambda gpt2, toks: _run(gpt2, toks, factlens.hook("blocks.0.attn.hook_patern", lambda t, h: t)),
        factlens.HookDidNotFireError, "get_act_name"),
    "hook that never fires": (
        lambda gpt2, toks: _run(gpt2, toks, factlens.hook("blocks.1.hook_mlp_out", lambda t, h: t + 1), stop_at_layer=1),
        factlens.HookDidNotFireError, "stop_at_layer"),
    "edit that changes nothing": (
        lambda gpt2, toks: _run(gpt2, toks, factlens.hook("blocks.0.hook_mlp_out", lambda t, h: t)),
        factlens.InterventionNoEffectError, "on_no_effect='ignore'"),
    "pattern of the wrong shape": (
        lambda gpt2, toks: _run(gpt2, toks, factlens.patch_pattern(gpt2, uniform(gpt2, toks)[:, :2])),
        factlens.ShapeError, "same tokens"),
    "pattern of the wrong dtype": (
        lambda gpt2, toks: _run(gpt2, toks, factlens.patch_pattern(gpt2, uniform(gpt2, toks).long())),
        factlens.ShapeError, "floating-point"),
    "pattern on the wrong device": (
        lambda gpt2, toks: _run(gpt2, toks, factlens.patch_pattern(gpt2, uniform(gpt2, toks).to("meta"))),
        factlens.ShapeError, ".to()"),
    "pattern rows not summing to 1": (
        lambda gpt2, toks: _run(gpt2, toks, factlens.patch_pattern(gpt2, 2 * uniform(gpt2, toks))),
        factlens.ShapeError, "hook_pattern, not hook_attn_scores"),
    "NaN in a pattern": (
        lambda gpt2, toks: _run(gpt2, toks, factlens.patch_pattern(gpt2, uniform(gpt2, toks) * float("nan"))),
        factlens.ShapeError, "NaN"),
    "NaN in a steering vector": (
        lambda gpt2, toks: factlens.add_vector(gpt2, torch.full((gpt2.cfg.d_model,), float("inf"))), factlens.ShapeError, "NaN"),
    "vector of the wrong size": (lambda gpt2, toks: factlens.add_vector(gpt2, torch.ones(3)), factlens.ShapeError, "d_model"),
    # reference models and checkpoints -----------------------------------------------------------------
    "reference with other layers": (
        lambda gpt2, toks: AttentionPatcher(factlens.build_hf("gpt2"), factlens.build_hf("gpt2", n_layer=3)),
        factlens.ArchitectureMismatchError, "same preset"),
    "reference with other heads / d_model": (
        lambda gpt2, toks: AttentionPatcher(factlens.build_hf("gpt2"), factlens.build_hf("gpt2", n_head=2, n_embd=32)),
        factlens.ArchitectureMismatchError, "n_embd"),
    "reference with another vocabulary": (
        lambda gpt2, toks: AttentionPatcher(factlens.build_hf("gpt2"), factlens.build_hf("gpt2", vocab_size=100)),
        factlens.ArchitectureMismatchError, "vocab_size"),
    "reference with a shorter context": (
        lambda gpt2, toks: AttentionPatcher(factlens.build_hf("gpt2"), factlens.build_hf("gpt2", n_positions=64)),
        factlens.ArchitectureMismatchError, "n_positions"),
    "missing checkpoint directory": (lambda gpt2, toks: load_checkpoint("/nonexistent/step_0000001"),
                                     factlens.CheckpointError, "list_checkpoints"),
    # decomposition, metrics, data, training ------------------------------------------------------------
    "rank-deficient decomposition": (
        lambda gpt2, toks: fit_decomposition(torch.randn(5, 8), torch.randn(5, 1, 8).expand(5, 3, 8).clone()),
        factlens.ConfigError, "ridge"),
    "NaN in decomposition data": (
        lambda gpt2, toks: fit_decomposition(torch.full((5, 8), float("nan")), torch.randn(5, 2, 8)),
        factlens.ShapeError, "NaN"),
    "plateau metric of mismatched length": (lambda gpt2, toks: plateau_end([0, 1], [1.0], 6.8), factlens.ShapeError, "equal length"),
    "population too small for celebrities": (lambda gpt2, toks: Celebrities(10, 20, 4.0), factlens.ConfigError, "n_celebrities"),
    "population too small for warm-up": (lambda gpt2, toks: WarmUp(10, 20, 1, 8), factlens.ConfigError, "n_warmup"),
    "more groups than people": (lambda gpt2, toks: Sequential(4, 8, 1, 100), factlens.ConfigError, "n_groups"),
    "Zipf alpha < 0": (lambda gpt2, toks: PowerLaw(100, -0.5), factlens.ConfigError, "alpha"),
    "sequence longer than the model's context": (
        lambda gpt2, toks: Trainer(TrainConfig.preset("tiny", model=dict(n_positions=16)), "/tmp/factlens-bad"),
        factlens.ConfigError, "n_positions"),
    "unknown training preset": (lambda gpt2, toks: TrainConfig.preset("huge"), factlens.ConfigError, "paper"),
    # sweeps and metrics ------------------------------------------------------------------------------------
    "metric returning the wrong shape": (
        lambda gpt2, toks: capitals.path_patch(gpt2, few_prompts(gpt2), metric=lambda logits: logits, progress=False),
        factlens.ShapeError, "scalar or [n]"),
    "metric returning NaN or inf": (
        lambda gpt2, toks: capitals.path_patch(gpt2, few_prompts(gpt2), progress=False,
                                               metric=lambda logits: torch.log(torch.zeros(logits.shape[0]))),
        factlens.ShapeError, "log-probability"),
    "eval-only sweep in train mode": (
        lambda gpt2, toks: in_train_mode(gpt2, lambda: capitals.path_patch(gpt2, few_prompts(gpt2), progress=False)),
        factlens.ModeError, "model.eval()"),
    # resources -----------------------------------------------------------------------------------------------
    "cache larger than the memory budget": (
        lambda gpt2, toks: factlens.run_with_cache(gpt2, toks.repeat(64, 1), budget="1MiB"),
        factlens.ResourceError, "names_filter"),
    "training run larger than the memory budget": (
        lambda gpt2, toks: with_budget("1MiB", lambda: Trainer(TrainConfig.preset("tiny"), "/tmp/factlens-bad")),
        factlens.ResourceError, "smaller batch_size"),
    "unreadable memory budget": (lambda gpt2, toks: set_memory_budget("lots"), factlens.ConfigError, "8GiB"),
    "CUDA requested without a GPU": (
        lambda gpt2, toks: Trainer(TrainConfig.preset("tiny"), "/tmp/factlens-bad", device="cuda"),
        factlens.ConfigError, "device='cpu'"),
}


def _run(model, tokens, *interventions, **kwargs):
    with factlens.intervene(model, *interventions):
        model(tokens, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA case only applies to machines without a GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, gpt2, toks):
    fn, error, fix = CASES[case]
    with pytest.raises(error) as info:
        fn(gpt2, toks)
    assert fix in str(info.value), f"{case}: the message does not name the fix: {info.value}"
    assert isinstance(info.value, factlens.FactlensError)


def test_truncated_checkpoint(checkpoint, tmp_path):
    bad = corrupt_copy(checkpoint, tmp_path, lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:100]))
    with pytest.raises(factlens.CheckpointError, match="truncated or corrupt"):
        load_checkpoint(bad)


def test_corrupt_manifest(checkpoint, tmp_path):
    bad = corrupt_copy(checkpoint, tmp_path, lambda d: (d / "manifest.json").write_text("{not json"))
    with pytest.raises(factlens.CheckpointError, match="resume from an earlier one"):
        load_checkpoint(bad)


def test_checkpoint_of_another_architecture(checkpoint):
    model = factlens.build_hf("gpt2", n_layer=2, n_embd=16, n_head=2, vocab_size=50)
    from factlens.checkpoints import load_state

    with pytest.raises(factlens.ArchitectureMismatchError, match="build_model"):
        load_state(model, load_checkpoint(checkpoint).state)


def test_resume_with_another_config(tmp_path):
    from factlens.bios.trainer import train
    from test_bios_train import tiny_config

    train(tiny_config(steps=5), tmp_path, progress=False)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["steps"] == 5
    with pytest.raises(factlens.CheckpointError, match="new output directory"):
        train(tiny_config(steps=5, lr=5e-3), tmp_path, progress=False)


def test_docs_list_every_case():
    """docs/reliability.md's catalogue has a row for every case here (keep the two in step)."""
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    missing = [case for case in CASES if f"| {case} |" not in doc]
    assert not missing, f"add these rows to docs/reliability.md: {missing}"
