"""Weights that do not match their config, unreadable files and unknown configuration keys are refused.

Every case asserts the factlens error class and that the message names what is wrong and the fix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import factlens
from factlens.bios import TrainConfig
from factlens.errors import CheckpointError, ConfigError
from factlens.inputs import hf_config_keys
from factlens.tokenizers import gpt2_tokenizer, opt_style_tokenizer

RUN = Path(__file__).parent / "data" / "bios_demo_run"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """One pristine save_pretrained folder per family (copied before each edit)."""
    out = {}
    for arch, tok in (("gpt2", gpt2_tokenizer), ("opt", opt_style_tokenizer)):
        d = tmp_path_factory.mktemp(f"pristine-{arch}")
        factlens.build_hf(arch).save_pretrained(d)
        tok().save_pretrained(d)
        out[arch] = d
    return out


def copy(folders, arch: str, tmp_path: Path) -> Path:
    d = tmp_path / f"{arch}-copy"
    shutil.copytree(folders[arch], d, dirs_exist_ok=True)
    return d


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder: Path, fn) -> None:
    state = load_file(folder / "model.safetensors")
    fn(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_pristine_folder_loads_with_the_saved_logits(folders, tmp_path):
    from transformers import GPT2LMHeadModel

    d = copy(folders, "gpt2", tmp_path)
    model = factlens.load(d, device="cpu", compat=False)
    hf = GPT2LMHeadModel.from_pretrained(d).eval()
    tokens = model.to_tokens("The capital of France is", prepend_bos=False)
    assert torch.allclose(model(tokens), hf(tokens).logits, atol=1e-4)


# ----------------------------------------------------------------------------- weights against their config
@pytest.mark.parametrize(("arch", "changes", "named"), [
    ("gpt2", {"n_layer": 3}, r"missing from the weights \(transformer\.h\.2\."),
    ("gpt2", {"n_layer": 1}, r"not in the model the config describes \(transformer\.h\.1\."),
    ("opt", {"num_hidden_layers": 3}, r"missing from the weights \(model\.decoder\.layers\.2\."),
    ("opt", {"num_hidden_layers": 1}, r"not in the model the config describes \(model\.decoder\.layers\.1\."),
    ("gpt2", {"vocab_size": 50000}, r"transformer\.wte\.weight \(checkpoint \(50257, 64\) vs config \(50000, 64\)\)"),
    ("gpt2", {"n_positions": 256}, r"transformer\.wpe\.weight \(checkpoint \(128, 64\) vs config \(256, 64\)\)"),
    ("opt", {"max_position_embeddings": 64}, r"embed_positions\.weight \(checkpoint"),
    ("opt", {"model_type": "gpt2"}, r"look like OPT weights but config\.json says model_type 'gpt2': fix model_type"),
    ("gpt2", {"model_type": "opt"}, r"look like GPT-2 weights but config\.json says model_type 'opt'"),
])
def test_a_config_that_disagrees_with_the_weights_is_refused(folders, tmp_path, arch, changes, named):
    d = copy(folders, arch, tmp_path)
    edit_config(d, **changes)
    with pytest.raises(CheckpointError, match=named) as err:
        factlens.load(d, device="cpu")
    assert "Fix config.json" in str(err.value) and "save_pretrained" in str(err.value)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_key_dropped_from_or_added_to_the_weights_is_refused(folders, tmp_path_factory, data):
    arch = data.draw(st.sampled_from(["gpt2", "opt"]))
    d = tmp_path_factory.mktemp("edited")
    shutil.copytree(folders[arch], d, dirs_exist_ok=True)
    keys = sorted(load_file(d / "model.safetensors"))
    if data.draw(st.booleans(), label="drop"):
        key = data.draw(st.sampled_from(keys), label="dropped key")
        edit_weights(d, lambda s: s.pop(key))
        expect = "missing from the weights"
    else:
        key = data.draw(st.sampled_from(keys), label="key to copy") + ".extra"
        edit_weights(d, lambda s: s.__setitem__(key, torch.zeros(3)))
        expect = "not in the model the config describes"
    with pytest.raises(CheckpointError, match=expect) as err:
        factlens.load(d, device="cpu")
    assert key in str(err.value)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_tensor_of_another_shape_is_refused(folders, tmp_path_factory, data):
    d = tmp_path_factory.mktemp("reshaped")
    shutil.copytree(folders["gpt2"], d, dirs_exist_ok=True)
    state = load_file(d / "model.safetensors")
    key = data.draw(st.sampled_from(sorted(k for k, v in state.items() if v.ndim >= 1)))
    edit_weights(d, lambda s: s.__setitem__(key, torch.zeros(s[key].shape[0] + 1, *s[key].shape[1:])))
    with pytest.raises(CheckpointError, match=f"{key} \\(checkpoint"):
        factlens.load(d, device="cpu")


@pytest.mark.parametrize("keep", [100, 2000, -100])
def test_truncated_weights_are_a_checkpoint_error(folders, tmp_path, keep):
    d = copy(folders, "gpt2", tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt.*save_pretrained"):
        factlens.load(d, device="cpu")


@pytest.mark.parametrize("damage", ["{not json", "", '{"version": "1.0", "model": 3}'])
def test_a_corrupt_tokenizer_is_a_checkpoint_error_naming_the_file(folders, tmp_path, damage):
    d = copy(folders, "gpt2", tmp_path)
    (d / "tokenizer.json").write_text(damage)
    with pytest.raises(CheckpointError, match=r"cannot read the tokenizer .*tokenizer\.json.*tokenizer\.save_pretrained"):
        factlens.load(d, device="cpu")


def test_a_tokenizer_larger_than_the_embedding_is_refused(folders, tmp_path):
    d = copy(folders, "gpt2", tmp_path)
    # the OPT-style tokenizer adds special tokens after GPT-2's 50257 embedding rows
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (d / f).unlink(missing_ok=True)
    opt_style_tokenizer().save_pretrained(d)
    with pytest.raises(CheckpointError, match=r"has \d+ tokens but the weights embed 50257.*resize_token_embeddings"):
        factlens.load(d, device="cpu")


def test_a_training_run_given_to_load_names_load_bridge():
    with pytest.raises(CheckpointError, match=r"factlens\.bios\.load_bridge"):
        factlens.load(RUN)
    step = sorted((RUN / "checkpoints").iterdir())[-1]
    with pytest.raises(CheckpointError, match=r"factlens\.bios\.load_bridge"):
        factlens.load(step)


# ----------------------------------------------------------------------------------- unknown configuration keys
@pytest.mark.parametrize(("arch", "key", "right"), [
    ("gpt2", "n_layers", "n_layer"), ("gpt2", "d_model", "n_embd"), ("gpt2", "n_heads", "n_head"),
    ("opt", "n_layers", "num_hidden_layers"), ("opt", "n_layer", "num_hidden_layers"), ("opt", "d_mlp", "ffn_dim"),
    ("gpt2", "n_embed", "n_embd"),
])
def test_tiny_refuses_a_key_nothing_reads_and_names_the_right_one(arch, key, right):
    with pytest.raises(ConfigError, match=f"unknown key '{key}' \\(did you mean '{right}'\\?\\)"):
        factlens.tiny(arch, **{key: 4})


def test_the_right_spelling_is_what_builds():
    assert factlens.tiny("gpt2", n_layer=3).cfg.n_layers == 3
    assert factlens.tiny("gpt2", num_hidden_layers=3).cfg.n_layers == 3  # GPT-2's own alias
    assert factlens.tiny("opt", num_hidden_layers=3).cfg.n_layers == 3


@settings(max_examples=25, deadline=None)
@given(key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=2, max_size=14), arch=st.sampled_from(["gpt2", "opt"]))
def test_any_unknown_model_key_is_refused_before_building(key, arch):
    if key in hf_config_keys(arch):
        factlens.models.hf_config(arch, **{key: getattr(factlens.models.hf_config(arch), key, None)})
        return
    with pytest.raises(ConfigError, match=f"unknown key '{key}'.*silently ignored"):
        factlens.models.hf_config(arch, **{key: 4})


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"model": {"n_layers": 4}}, r"TrainConfig\.model .* unknown key 'n_layers' \(did you mean 'n_layer'\?\)"),
    ({"model": {"d_model": 64}}, r"unknown key 'd_model' \(did you mean 'n_embd'\?\)"),
    ({"n_peple": 10}, r"TrainConfig\.preset\('tiny'\) got unknown key 'n_peple' \(did you mean 'n_people'\?\)"),
    ({"pools": {"citys": 3}}, r"TrainConfig\.pools .* unknown key 'citys' \(did you mean 'cities'\?\)"),
    ({"arch": "llama"}, r"arch='llama'"),
])
def test_train_configs_refuse_keys_nothing_reads(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        TrainConfig.preset("tiny", **kwargs)


def test_config_classes_refuse_unknown_keyword_arguments():
    from factlens.bios.finetune import FinetuneConfig
    from factlens.bios.patching.config import PatchConfig

    with pytest.raises(ConfigError, match=r"preset\('tiny'\) got unknown key 'n_layer' \(did you mean \"model="):
        TrainConfig.preset("tiny", n_layer=4)
    with pytest.raises(ConfigError, match=r"TrainConfig\(\.\.\.\) got unknown key 'stepz' \(did you mean 'steps'\?\)"):
        TrainConfig(stepz=3)
    with pytest.raises(ConfigError, match=r"PatchConfig\(\.\.\.\) got unknown key 'refrence'"):
        PatchConfig(refrence="runs/ref")
    with pytest.raises(ConfigError, match=r"FinetuneConfig\(\.\.\.\) got unknown key"):
        FinetuneConfig(init_fro="runs/ref")


def test_a_stored_config_with_an_unknown_key_is_refused_and_a_good_one_round_trips():
    config = TrainConfig.preset("tiny", model={"n_layer": 3}, arch="opt")
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"TrainConfig\.from_dict got unknown key .stepz. \(did you mean .steps.\?\)"):
        TrainConfig.from_dict({**config.to_dict(), "stepz": 5})


def test_stored_config_dicts_keep_loading_while_user_overrides_are_checked():
    config = factlens.models.hf_config("opt").to_dict()  # carries activation_dropout, which OPT no longer reads
    assert factlens.models.from_config(config).config.num_hidden_layers == 2
    with pytest.raises(ConfigError, match="unknown key 'n_layers'"):
        factlens.build_hf("opt", n_layers=4)
