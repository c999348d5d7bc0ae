"""Attention patching's edge cases (issue 14, root cause 7, and the patching red team).

Each case asserts the error class and that the message names the fix, or asserts the correct behaviour: DDP with
fully patched OPT layers, the trainee passed as its own reference, ``start_patching`` outside the run, references
of another architecture (refused before step 0, before anything is written), reference steps a run does not have
(yet), the attention-to-name analysis on OPT runs and its 0-based layer numbering.
"""

from __future__ import annotations

import copy
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

import factlens
from ddp import torchrun
from factlens.bios.config import hf_field_names
from factlens.bios.patching.circuits import AttentionToNameResult, attention_to_name
from factlens.bios.patching.config import PatchConfig
from factlens.bios.patching.references import Reference, patched_forward
from factlens.bios.patching.training import AttentionPatcher, PatternRecorder
from factlens.bios.run import reference_checkpoint
from factlens.bios.trainer import Trainer, train
from test_bios_train import tiny_config


@pytest.fixture(scope="module")
def opt_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("opt_reference")
    train(tiny_config(arch="opt", steps=10, lr=3e-3), out, progress=False)
    return out


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpt2_reference")
    train(tiny_config(steps=10, lr=3e-3), out, progress=False)
    return out


def _tiny_hf(arch: str, seed: int):
    sizes = hf_field_names(arch, dict(n_layer=2, n_head=2, n_embd=32, n_inner=64))  # OPT spells them its own way
    return factlens.build_hf(arch, seed=seed, vocab_size=100, **sizes)


# --------------------------------------------------------------------------------------- DDP on OPT
_DDP = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_bios_train import tiny_config
    from factlens.bios.config import PatchConfig, hf_field_names
    from factlens.bios.trainer import Trainer
    patch = PatchConfig(reference={ref!r}, reference_step=10, start_patching=1)
    trainer = Trainer(tiny_config(arch="opt", batch_size=8, steps=10, patch=patch), {out!r}, progress=False,
                      device="cpu")
    trainer.raw_model.train()
    for step in range(4):
        trainer.sync_patching(step)
        trainer.train_step(step)
    flat = torch.cat([p.detach().flatten() for p in trainer.raw_model.parameters()])
    if trainer.rank == 0:
        torch.save(flat, {out!r} + "/params.pt")
""")


@pytest.mark.slow  # two DDP subprocesses: .ci/run runs it in its slow step
def test_ddp_with_fully_patched_opt_layers_matches_one_process(opt_run, tmp_path):
    # Patching starts at step 1, so DDP first trains every parameter, then the fully patched layers' q_proj and
    # k_proj get no gradient: DDP used to stop with "Expected to have finished reduction".
    patch = PatchConfig(reference=str(opt_run), reference_step=10, start_patching=1)
    single = Trainer(tiny_config(arch="opt", batch_size=8, steps=10, patch=patch), tmp_path / "single",
                     progress=False, device="cpu")
    single.raw_model.train()
    for step in range(4):
        single.sync_patching(step)
        single.train_step(step)
    expected = torch.cat([p.detach().flatten() for p in single.raw_model.parameters()])
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "ddp_patch_worker.py"
    script.write_text(_DDP.format(tests=str(Path(__file__).parent), ref=str(opt_run), out=str(out)))
    torchrun(script)
    torch.testing.assert_close(torch.load(out / "params.pt", weights_only=True), expected, atol=2e-5, rtol=1e-4)


def test_fully_patched_opt_layers_freeze_q_and_k_until_removed():
    model, reference = _tiny_hf("opt", 0), _tiny_hf("opt", 1)
    qk = [p for n, p in model.named_parameters() if "layers.1." in n and ("q_proj" in n or "k_proj" in n)]
    with AttentionPatcher(model, reference, layers=[1]) as patcher:
        assert set(map(id, patcher.frozen)) == set(map(id, qk)) and len(qk) == 4  # weight + bias of q and k
        assert [n for n, p in model.named_parameters() if not p.requires_grad] == [
            n for n, p in model.named_parameters() if "layers.1." in n and ("q_proj" in n or "k_proj" in n)]
        patcher.forward(torch.randint(0, 100, (2, 6)), labels=torch.randint(0, 100, (2, 6))).loss.backward()
    assert all(p.requires_grad for p in model.parameters()) and patcher.frozen == []
    # a subset of heads still uses the layer's own q and k for the other heads: nothing is frozen
    with AttentionPatcher(model, reference, heads=[0]) as patcher:
        assert patcher.frozen == [] and all(p.requires_grad for p in model.parameters())
    # GPT-2's fused c_attn keeps training its value columns: nothing to freeze
    gpt2 = _tiny_hf("gpt2", 0)
    with AttentionPatcher(gpt2, _tiny_hf("gpt2", 1)) as patcher:
        assert patcher.frozen == [] and all(p.requires_grad for p in gpt2.parameters())


@pytest.mark.slow
def test_compiled_patched_training_matches_eager(gpt2_run, tmp_path):
    # torch.compile of the model and of the reference (the recorder's forward), patching from step 2 on
    losses = {}
    for compiled in (False, True):
        patch = PatchConfig(reference=str(gpt2_run), reference_step=10, start_patching=2)
        trainer = Trainer(tiny_config(steps=10, compile=compiled, patch=patch), tmp_path / str(compiled),
                          progress=False, device="cpu")
        trainer.raw_model.train()
        losses[compiled] = []
        for step in range(4):
            trainer.sync_patching(step)
            losses[compiled].append(float(trainer.train_step(step)))
        assert trainer.patcher.captured == trainer.patcher.consumed == {0: 2, 1: 2}
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


# ----------------------------------------------------------------------------- the trainee as reference
def test_the_trained_model_is_refused_as_its_own_reference():
    model = _tiny_hf("gpt2", 0)
    for reference in (model, torch.compile(model)):  # the same module, also behind a torch.compile wrapper
        with pytest.raises(factlens.ConfigError, match=r"copy\.deepcopy"):
            AttentionPatcher(model, reference)
    sharing = _tiny_hf("gpt2", 1)
    sharing.transformer.wte = model.transformer.wte  # another module holding one of the trainee's tensors
    with pytest.raises(factlens.ConfigError, match=r"transformer\.wte\.weight.*copy\.deepcopy"):
        AttentionPatcher(model, sharing)
    assert all(p.requires_grad for p in model.parameters())  # the refusal froze nothing
    AttentionPatcher(model, copy.deepcopy(model))  # the fix the message names works


# ------------------------------------------------------------------------------ PatchConfig validation
@pytest.mark.parametrize(("kwargs", "fix"), [
    (dict(start_patching=-3), r"start_patching=-3.*0 patches the whole run"),
    (dict(start_patching=2.5), r"start_patching=2\.5.*whole number"),
    (dict(reference_step=-1), r"reference_step=-1.*checkpoint step"),
    (dict(layers=[]), r"layers=\[\].*omit layers"),
    (dict(heads=[0, 0]), r"heads=\[0, 0\].*each head once"),
    (dict(heads=[-1]), r"heads=\[-1\].*0-based"),
    (dict(reference=""), r"reference=''.*run directory"),
])
@pytest.mark.usefixtures("unchecked")  # wrong field types on purpose: factlens's own ConfigError
def test_patch_config_refuses_bad_fields(kwargs, fix):
    with pytest.raises(factlens.ConfigError, match=fix):
        PatchConfig(**{"reference": "runs/ref", "reference_step": 10, **kwargs})


@pytest.mark.parametrize("start", [10, 50])
def test_start_at_or_past_the_end_is_refused_before_anything_is_written(gpt2_run, tmp_path, start):
    patch = PatchConfig(reference=str(gpt2_run), reference_step=10, start_patching=start)
    with pytest.raises(factlens.ConfigError, match=rf"start_patching={start}.*0\.\.9"):
        train(tiny_config(steps=10, patch=patch), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ references checked before step 0
def test_reference_of_another_architecture_is_refused_before_step_0(opt_run, tmp_path):
    patch = PatchConfig(reference=str(opt_run), reference_step=10, start_patching=5)
    with pytest.raises(factlens.ArchitectureMismatchError, match=r"OPT.*GPT-2.*arch='opt'"):
        train(tiny_config(steps=10, patch=patch), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_opt_model_with_a_gpt2_reference_is_refused_naming_the_arch():
    with pytest.raises(factlens.ArchitectureMismatchError, match=r"a GPT-2 model.*an OPT model.*arch='gpt2'"):
        AttentionPatcher(_tiny_hf("opt", 0), _tiny_hf("gpt2", 1))


def test_reference_with_fewer_layers_is_refused_before_step_0(tmp_path):
    shallow = tmp_path / "shallow"
    train(tiny_config(steps=2, checkpoint_every=2, model=dict(n_layer=1)), shallow, progress=False)
    patch = PatchConfig(reference=str(shallow), reference_step=2, start_patching=4)
    with pytest.raises(factlens.ArchitectureMismatchError, match=r"n_layer: 1 vs 2.*same preset"):
        Trainer(tiny_config(steps=10, patch=patch), tmp_path / "run", progress=False)


def test_heads_and_layers_out_of_range_are_refused_before_step_0(gpt2_run, tmp_path):
    for field, fix in (("heads", r"head 5 is out of range.*use 0\.\.1"), ("layers", r"layer 7 is out of range.*use 0\.\.1")):
        patch = PatchConfig(reference=str(gpt2_run), reference_step=10, start_patching=5,
                            **{field: [5 if field == "heads" else 7]})
        with pytest.raises(factlens.ConfigError, match=fix):
            Trainer(tiny_config(steps=10, patch=patch), tmp_path / "run", progress=False)


def test_reference_step_the_run_does_not_have(gpt2_run):
    with pytest.raises(factlens.CheckpointError, match=r"step 7.*available: \[0, 10\]"):
        reference_checkpoint(PatchConfig(reference=str(gpt2_run), reference_step=7))
    with pytest.raises(factlens.CheckpointError, match=r"does not exist.*run directory"):
        reference_checkpoint(PatchConfig(reference=str(gpt2_run / "nope"), reference_step=10))


def test_reference_run_still_being_written(gpt2_run, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(gpt2_run, partial)
    shutil.rmtree(partial / "checkpoints" / "step_0000010")  # as if the run were still at step 0 of 10
    with pytest.raises(factlens.CheckpointError, match=r"reached step 0 of 10.*finish.*available: \[0\]"):
        reference_checkpoint(PatchConfig(reference=str(partial), reference_step=10))


def test_checkpoint_directory_with_another_reference_step(gpt2_run):
    ckpt = gpt2_run / "checkpoints" / "step_0000010"
    assert reference_checkpoint(PatchConfig(reference=str(ckpt))) == ckpt
    with pytest.raises(factlens.ConfigError, match=r"reference_step=0.*step 10.*run directory"):
        reference_checkpoint(PatchConfig(reference=str(ckpt), reference_step=0))


def test_opt_bridge_with_a_gpt2_reference_is_refused():
    opt = factlens.tiny("opt", seed=0)
    gpt2_ref = Reference.from_model(factlens.tiny("gpt2", seed=1, n_layer=1))
    with pytest.raises(factlens.ArchitectureMismatchError, match=r"layers: reference 1 vs model 2.*same architecture"):
        patched_forward(opt, opt.to_tokens("The capital of France is"), gpt2_ref)


# ------------------------------------------------------------------------- one capture implementation
def test_pattern_recorder_matches_explicit_softmax_and_leaves_no_edit(arch):
    model = _tiny_hf(arch, 0).eval()
    tokens = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        plain = model(tokens).logits
        patterns = PatternRecorder(model).run(tokens)
        out = model(tokens, output_attentions=False).logits
    assert sorted(patterns) == [0, 1] and patterns[0].shape == (2, 2, 7, 7)
    torch.testing.assert_close(patterns[0].sum(-1), torch.ones(2, 2, 7))
    assert not patterns[1].triu(1).any()  # causal
    torch.testing.assert_close(out, plain)  # capturing changed nothing and left nothing installed
    ref = Reference.from_model(model)
    assert all(torch.equal(ref.patterns(tokens)[k], patterns[k]) for k in patterns)


# ------------------------------------------------------------------- attention to the name: OPT, layers
def test_attention_to_name_on_an_opt_run_numbers_layers_from_0(opt_run):
    result = attention_to_name(opt_run, steps=[0, 10], n_sequences=8, batch_size=8, progress=False)
    df = result.to_dataframe()
    assert sorted(set(df["layer"])) == [0, 1]
    first = df[(df.layer == 0) & (df.circuit == "name_grouping→name") & (df.step == 10)]["attention"].item()
    assert first == pytest.approx(float(result.values[1, 0, 0]))
    fig = result.plot(layers=[0])
    trace = next(t for t in fig.data if t.name == "name_grouping→name (layer 0)")
    assert list(trace.y) == pytest.approx(result.values[:, 0, 0].tolist())  # layer 0 is the first layer
    default = {t.name for t in result.plot().data}  # name grouping in the first layer, extraction in the last
    assert default == {"name_grouping→name (layer 0)", "extraction→name (layer 1)", "extraction→text (layer 1)"}
    with pytest.raises(factlens.ConfigError, match=r"layer 2.*0\.\.1"):
        result.plot(layers=[2])


def test_attention_to_name_needs_at_least_one_step(gpt2_run):
    with pytest.raises(factlens.ConfigError, match=r"steps=\[\].*omit steps"):
        attention_to_name(gpt2_run, steps=[], progress=False)
    with pytest.raises(factlens.CheckpointError, match=r"step 7; available: \[0, 10\]"):
        attention_to_name(gpt2_run, steps=[0, 7], progress=False)  # refused before any checkpoint is measured


def test_attention_to_name_result_plot_labels_match_values():
    values = torch.rand(2, 3, 3)
    result = AttentionToNameResult(values, steps=[0, 10])
    for trace in result.plot(layers=[2, 0]).data:
        layer = int(trace.name.rsplit("layer ", 1)[1].rstrip(")"))
        circuit = result.circuits.index(trace.name.split(" (")[0])
        assert list(trace.y) == pytest.approx(values[:, layer, circuit].tolist())
