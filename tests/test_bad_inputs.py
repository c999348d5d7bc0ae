"""The bad-input catalogue: each case raises a specific factlens error whose message names the fix.

docs/reliability.md lists the same catalogue (input → error → fix).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import factlens
from factlens import recall
from factlens.bios.data.samplers import Celebrities, PowerLaw, Sequential, WarmUp
from factlens.bios.patching.training import AttentionPatcher
from factlens.bios.phases import plateau_end
from factlens.bios.trainer import TrainConfig, Trainer
from factlens.checkpoints import load_checkpoint, save_checkpoint
from factlens.recall.datasets import make_dataset, make_prompt_dataset
from factlens.recall.regression import fit_decomposition
from factlens.recall.relations import CAPITALS, make_relation
from factlens.resources import set_memory_budget
from factlens.tokenizers import gpt2_tokenizer

pytestmark = pytest.mark.usefixtures("unchecked")  # wrong arguments on purpose: factlens's own errors


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
    return recall.dataset_for(model).select(range(n))


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
        lambda gpt2, toks: recall.path_patch(gpt2, few_prompts(gpt2), metric=lambda logits: logits, progress=False),
        factlens.ShapeError, "scalar or [n]"),
    "metric returning NaN or inf": (
        lambda gpt2, toks: recall.path_patch(gpt2, few_prompts(gpt2), progress=False,
                                               metric=lambda logits: torch.log(torch.zeros(logits.shape[0]))),
        factlens.ShapeError, "log-probability"),
    "eval-only sweep in train mode": (
        lambda gpt2, toks: in_train_mode(gpt2, lambda: recall.path_patch(gpt2, few_prompts(gpt2), progress=False)),
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


# run directories, optimiser settings, divergence, storage (issue 14, root causes 1 and 2) -------------------------
_SCRATCH: list = []


@pytest.fixture(autouse=True, scope="module")
def _scratch_root(tmp_path_factory):
    _SCRATCH[:] = [tmp_path_factory.mktemp("bad-runs")]


def _scratch(name: str):
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(dir=_SCRATCH[0], prefix=name))


def _run_cfg(**overrides):
    base = dict(steps=3, n_people=16, batch_size=4, n_eval_sequences=8, n_unseen=0, checkpoint_every=3,
                log_every=3, resume_every=3, eval_batch_size=8,
                pools=dict(first_names=20, last_names=20, cities=10, universities=6, majors=5, companies=6, years=10))
    return TrainConfig.preset("tiny", **{**base, **overrides})


_FINISHED: list = []


def _finished_run():
    """A copy of a finished 3-step tiny run (trained once per session), for a case to spoil."""
    from factlens.bios.trainer import train

    if not _FINISHED:
        _FINISHED.append(_scratch("finished") / "run")
        train(_run_cfg(), _FINISHED[0], progress=False)
    target = _scratch("copy") / "run"
    shutil.copytree(_FINISHED[0], target)
    return target


def _train_into(out, config=None):
    from factlens.bios.trainer import train

    return train(config or _run_cfg(), out, progress=False)


def _foreign_dir(kind: str):
    out = _scratch("foreign") / "out"
    if kind == "hf":
        factlens.build_hf("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=50).save_pretrained(out)
    else:
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"epoch": 1, "val_loss": 0.31}\n')
    return _train_into(out)


def _locked():
    from factlens.bios.run import LOCK
    from factlens.storage import FolderLock as RunLock

    out = _finished_run()
    with RunLock(out / LOCK):
        return _train_into(out)


def _edited_config_json():
    from factlens.bios.run import Run

    out = _finished_run()
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "lr": 0.5}))
    return Run(out).config


def _mixed_checkpoints():
    from factlens.bios.run import Run

    out = _finished_run()
    manifest = out / "checkpoints" / "step_0000000" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["config"]["steps"] = 30  # as if copied in from a longer run
    manifest.write_text(json.dumps(m))
    return Run(out).config


def _failing_save(code: int):
    import os
    from unittest import mock

    with mock.patch("factlens.checkpoints.save_file", side_effect=OSError(code, os.strerror(code))):
        return _train_into(_scratch("disk") / "run")


def _little_disk():
    from unittest import mock

    with mock.patch("factlens.bios.run.free_bytes", return_value=10_000):
        return _train_into(_scratch("disk") / "run")


def _metrics_file(text: str):
    from factlens.bios.run import Run

    out = _scratch("metrics")
    (out / "metrics.jsonl").write_text(text)
    return Run(out).history


def _empty_checksums(checkpoint, tmp):
    bad = tmp / "empty-sums"
    shutil.copytree(checkpoint, bad)
    m = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**m, "sha256": {}}))
    return load_checkpoint(bad)


def _diverged():
    trainer = Trainer(_run_cfg(), _scratch("nan") / "run", progress=False)
    with torch.no_grad():
        next(trainer.raw_model.parameters()).fill_(float("nan"))  # as a too-large step leaves it
    return trainer.run()


def _cli():
    import importlib

    return importlib.import_module("factlens.cli.bios")


def _out_is_a_file():
    from factlens.bios.run import Run

    path = _scratch("file") / "out"
    path.write_text("not a directory")
    return Run(path).check(_run_cfg())


CASES.update({
    "min_lr above lr": (lambda gpt2, toks: TrainConfig.preset("tiny", min_lr=1e4), factlens.ConfigError, "min_lr <= lr"),
    "negative weight decay": (lambda gpt2, toks: TrainConfig.preset("tiny", weight_decay=-0.1), factlens.ConfigError,
                              "weight_decay >= 0"),
    "AdamW beta of 1 or more": (lambda gpt2, toks: TrainConfig.preset("tiny", betas=(0.9, 1.0)), factlens.ConfigError,
                                "[0, 1)"),
    "zero learning rate": (lambda gpt2, toks: TrainConfig.preset("tiny", lr=0.0), factlens.ConfigError, "e.g. 4e-4"),
    "non-positive gradient clip": (lambda gpt2, toks: TrainConfig.preset("tiny", grad_clip=0.0), factlens.ConfigError,
                                   "or None"),
    "zero training steps": (lambda gpt2, toks: TrainConfig.preset("tiny", steps=0), factlens.ConfigError,
                            "positive integer"),
    "malformed --sampler JSON": (lambda gpt2, toks: _cli()._sampler_json("{kind: power_law}"),
                                 factlens.ConfigError, "double quotes"),
    "--out that is a file": (lambda gpt2, toks: _out_is_a_file(), factlens.ConfigError, "Pass a directory path"),
    "--run that does not exist": (lambda gpt2, toks: _cli()._existing_run("/nonexistent/run"),
                                  factlens.CheckpointError, "--out directory of a training run"),
    "--out holding a Hugging Face model": (lambda gpt2, toks: _foreign_dir("hf"), factlens.CheckpointError,
                                           "new or empty directory"),
    "--out holding another tool's metrics.jsonl": (lambda gpt2, toks: _foreign_dir("metrics"), factlens.CheckpointError,
                                                   "new or empty directory"),
    "shorter run into an older run's directory": (
        lambda gpt2, toks: _train_into(_finished_run(), _run_cfg(steps=2, checkpoint_every=1)),
        factlens.CheckpointError, "new output directory"),
    "second trainer in a locked run directory": (lambda gpt2, toks: _locked(), factlens.CheckpointError,
                                                 "Wait for it to finish"),
    "config.json edited by hand": (lambda gpt2, toks: _edited_config_json(), factlens.CheckpointError,
                                   "Restore it or delete it"),
    "checkpoints of two runs in one directory": (lambda gpt2, toks: _mixed_checkpoints(), factlens.CheckpointError,
                                                 "own directory"),
    "full disk while writing a checkpoint": (lambda gpt2, toks: _failing_save(28), factlens.errors.StorageError,
                                             "Free some space"),
    "read-only output directory": (lambda gpt2, toks: _failing_save(30), factlens.errors.StorageError,
                                   "writable directory"),
    "too little free disk for the run": (lambda gpt2, toks: _little_disk(), factlens.errors.StorageError,
                                         "fewer checkpoints"),
    "empty metrics file": (lambda gpt2, toks: _metrics_file(""), factlens.EmptyDatasetError, "resume it"),
    "metrics.jsonl corrupt before its last line": (
        lambda gpt2, toks: _metrics_file('{"kind": "eval", "step": 0}\n{"kind": "ev\n{"kind": "eval", "step": 1}\n'),
        factlens.CheckpointError, "Delete that line"),
    "training that diverges to NaN": (lambda gpt2, toks: _diverged(), factlens.errors.DivergenceError, "lower lr"),
})

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


def test_manifest_with_an_empty_checksum_map(checkpoint, tmp_path):
    with pytest.raises(factlens.CheckpointError, match=r"cannot be verified.*Delete this checkpoint"):
        _empty_checksums(checkpoint, tmp_path)


def test_docs_list_every_case():
    """docs/reliability.md's catalogue has a row for every case here (keep the two in step)."""
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    missing = [case for case in CASES if f"| {case} |" not in doc]
    assert not missing, f"add these rows to docs/reliability.md: {missing}"
