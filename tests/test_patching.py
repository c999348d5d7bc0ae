"""Attention-pattern patching from reference checkpoints (Zucchet et al. §2.2): training and evaluation."""

from __future__ import annotations

import json

import pytest
import torch

import factlens
from factlens.bios.patching.circuits import attention_to_name
from factlens.bios.patching.config import PatchConfig
from factlens.bios.patching.references import Reference, patched_forward
from factlens.bios.patching.training import AttentionPatcher
from factlens.bios.run import load_bridge, reference_checkpoint
from factlens.bios.trainer import Trainer, train
from factlens.checkpoints import load_checkpoint
from test_bios_train import tiny_config, train_losses


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    train(tiny_config(steps=20, lr=3e-3), out, progress=False)
    return out


def test_own_patterns_give_the_same_loss(arch):
    model = factlens.build_hf(arch, seed=0).eval()
    twin = factlens.build_hf(arch, seed=0).eval()
    tokens = torch.randint(0, 2000, (3, 12))
    with torch.no_grad():
        plain = model(tokens, labels=tokens).loss
        with AttentionPatcher(model, twin) as patcher:
            patched = patcher.forward(tokens, labels=tokens).loss
    patcher.check_fired()
    torch.testing.assert_close(patched, plain, atol=1e-5, rtol=0)


def test_patched_training_step_gives_no_qk_gradient(arch):
    model = factlens.build_hf(arch, seed=0).train()
    reference = factlens.build_hf(arch, seed=1)
    tokens = torch.randint(0, 2000, (2, 10))
    with AttentionPatcher(model, reference) as patcher:
        patcher.forward(tokens, labels=tokens).loss.backward()
    d = model.config.hidden_size
    for name, p in model.named_parameters():
        if arch == "gpt2" and name.endswith("attn.c_attn.weight"):
            assert not p.grad[:, : 2 * d].any() and p.grad[:, 2 * d:].abs().sum() > 0  # q,k none; v yes
        elif any(s in name for s in ("q_proj", "k_proj")):
            assert p.grad is None or not p.grad.any()
        elif any(s in name for s in ("v_proj", "out_proj", "c_proj", "mlp", "fc1", "fc2")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_patch_subset_of_heads_and_layers(arch):
    model = factlens.build_hf(arch, seed=0).eval()
    reference = factlens.build_hf(arch, seed=1)
    tokens = torch.randint(0, 2000, (2, 10))
    with torch.no_grad():
        plain = model(tokens).logits
        with AttentionPatcher(model, reference, layers=[1], heads=[0]) as patcher:
            patched = patcher.forward(tokens).logits
    patcher.check_fired()
    assert patcher.captured == {1: 1} and (patched - plain).abs().max() > 0


def test_architecture_mismatch_is_refused():
    model = factlens.build_hf("gpt2", seed=0)
    with pytest.raises(factlens.ArchitectureMismatchError, match="n_layer"):
        AttentionPatcher(model, factlens.build_hf("gpt2", n_layer=3))
    with pytest.raises(factlens.ArchitectureMismatchError, match=r"an OPT model.*a GPT-2 model.*arch='opt'"):
        AttentionPatcher(model, factlens.build_hf("opt"))
    bridge = factlens.tiny("gpt2", n_head=2, n_embd=32)
    with pytest.raises(factlens.ArchitectureMismatchError, match="heads"):
        Reference.from_model(factlens.build_hf("gpt2")).check_compatible(bridge)


def test_freeze_at_reference_step_equals_reference_until_then(reference_run, tmp_path):
    patch = PatchConfig(reference=str(reference_run), reference_step=10, start_patching=10)
    train(tiny_config(steps=20, lr=3e-3, patch=patch), tmp_path, progress=False)
    ref_losses, patched_losses = train_losses(reference_run), train_losses(tmp_path)
    assert [x for x in patched_losses if x[0] <= 10] == [x for x in ref_losses if x[0] <= 10]
    a = load_checkpoint(tmp_path / "checkpoints" / "step_0000010").state
    b = load_checkpoint(reference_run / "checkpoints" / "step_0000010").state
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [x for x in patched_losses if x[0] > 10] != [x for x in ref_losses if x[0] > 10]


def test_patching_with_another_checkpoint_changes_the_loss(reference_run, tmp_path):
    plain = train_losses(reference_run)
    patch = PatchConfig(reference=str(reference_run), reference_step=20, start_patching=0)
    train(tiny_config(steps=20, lr=3e-3, patch=patch), tmp_path, progress=False)
    patched = train_losses(tmp_path)
    assert patched[0][1] != plain[0][1]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["patch"]["reference_step"] == 20


def test_opt_run_is_patched_not_skipped(tmp_path):
    ref_dir = tmp_path / "ref"
    train(tiny_config(arch="opt", steps=10), ref_dir, progress=False)
    patch = PatchConfig(reference=str(ref_dir), reference_step=10, start_patching=0)
    trainer = Trainer(tiny_config(arch="opt", steps=10, patch=patch), tmp_path / "patched", progress=False)
    trainer.sync_patching(0)
    assert trainer.patcher.installed
    trainer.raw_model.train()
    trainer.train_step(0)
    assert all(trainer.patcher.consumed[layer] == 1 for layer in trainer.patcher.layers)


def test_patch_config_errors(reference_run):
    with pytest.raises(factlens.ConfigError, match="reference_step"):
        reference_checkpoint(PatchConfig(reference=str(reference_run)))
    with pytest.raises(factlens.CheckpointError, match="available"):
        reference_checkpoint(PatchConfig(reference=str(reference_run), reference_step=7))


def test_evaluation_patching_proves_itself(reference_run):
    bridge = load_bridge(reference_run, step=0)
    tokens = torch.randint(4, 200, (2, 12))
    logits = patched_forward(bridge, tokens, Reference.from_checkpoint(reference_run, step=20))
    assert (logits - bridge(tokens)).abs().max() > 0
    with pytest.raises(factlens.InterventionNoEffectError):
        patched_forward(bridge, tokens, Reference.from_checkpoint(reference_run, step=0))
    # the same tool on an OPT twin, with a reference bridge as the source
    opt, opt_ref = factlens.tiny("opt", seed=0), factlens.tiny("opt", seed=1)
    toks = opt.to_tokens("The capital of France is")
    assert (patched_forward(opt, toks, Reference.from_model(opt_ref)) - opt(toks)).abs().max() > 0


def test_reference_from_locally_saved_pretrained_directory(tmp_path):
    hf = factlens.build_hf("gpt2", seed=3).eval()
    hf.save_pretrained(tmp_path / "model")
    factlens.tokenizers.gpt2_tokenizer().save_pretrained(tmp_path / "model")
    ref = Reference.from_pretrained(str(tmp_path / "model"))
    bridge = factlens.tiny("gpt2", seed=0)
    tokens = bridge.to_tokens("The capital of France is")
    expected = Reference.from_model(hf).patterns(tokens)
    got = ref.patterns(tokens)
    assert all(torch.allclose(got[k], expected[k], atol=1e-5) for k in expected)


def test_attention_to_name_analysis(reference_run):
    result = attention_to_name(reference_run, steps=[0, 20], n_sequences=16, batch_size=8, progress=False)
    df = result.to_dataframe()
    assert set(df["circuit"]) == {"name_grouping→name", "extraction→name", "extraction→text"}
    assert ((df["attention"] >= 0) & (df["attention"] <= 1)).all()
    ext = result.values[:, :, 1] + result.values[:, :, 2]
    assert (ext <= 1 + 1e-5).all()  # name and text are disjoint targets
    assert result.plot().layout.yaxis.title.text.startswith("attention")


def test_two_patchers_can_share_one_reference():
    reference = factlens.build_hf("gpt2", seed=1)
    a, b = factlens.build_hf("gpt2", seed=0).eval(), factlens.build_hf("gpt2", seed=2).eval()
    tokens = torch.randint(0, 2000, (2, 10))
    with AttentionPatcher(a, reference) as pa, AttentionPatcher(b, reference) as pb, torch.no_grad():
        pa.forward(tokens)
        pb.forward(tokens)
    pa.check_fired()
    pb.check_fired()
