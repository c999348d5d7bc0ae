"""Loading weights from the user's disk: save_pretrained folders, the HF-cache layout, HF ids offline.

Every checkpoint here is a random-weight twin written by ``save_pretrained``; everything runs with
``HF_HUB_OFFLINE=1`` and an empty (temporary) HF cache, so nothing can come from the hub.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel, OPTForCausalLM, PreTrainedTokenizerFast

import factlens
from factlens import loading
from factlens.errors import CheckpointError, ConfigError, ModeError, UnknownModelError
from factlens.tokenizers import gpt2_tokenizer, opt_style_tokenizer

TEXTS = ["The capital of France is", "Keep in mind, the capital of Japan is"]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No hub, and an empty HF cache of our own."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def trained_bpe(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here: its ids have nothing to do with GPT-2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [f"The capital of {c} is {k}." for c, k in [("France", "Paris"), ("Japan", "Tokyo"),
                                                       ("Italy", "Rome"), ("Spain", "Madrid")]] * 20 + TEXTS
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_twin(folder, family: str, tokenizer: str = "factlens"):
    """A random twin saved as a user would save a checkpoint; returns the plain HF model."""
    if tokenizer == "factlens":
        tok = gpt2_tokenizer() if family == "gpt2" else opt_style_tokenizer()
        hf = factlens.build_hf(family, seed=3)
    else:
        tok = trained_bpe()
        ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=1)
        hf = factlens.build_hf(family, seed=3, vocab_size=len(tok), **ids)
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return hf


def plain_hf(folder, family: str):
    cls = GPT2LMHeadModel if family == "gpt2" else OPTForCausalLM
    return cls.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.mark.parametrize(("family", "tokenizer"), [("gpt2", "factlens"), ("opt", "trained"), ("gpt2", "trained")])
def test_save_pretrained_folder_matches_plain_hf(tmp_path, offline, family, tokenizer):
    folder = tmp_path / "ckpt"
    save_twin(folder, family, tokenizer)
    own = AutoTokenizer.from_pretrained(folder)
    bridge = factlens.load(folder, device="cpu", compat=False)
    assert bridge.factlens_family == family and not loading.is_twin(bridge)
    for text in TEXTS:  # the ids are the folder tokenizer's, not factlens's BPE
        ids = bridge.to_tokens(text, prepend_bos=False)[0].tolist()
        assert ids == own(text, add_special_tokens=False)["input_ids"]
        if tokenizer == "trained":
            assert ids != gpt2_tokenizer()(text)["input_ids"]
    hf = plain_hf(folder, family)
    compat = factlens.load(folder, device="cpu")  # the default: compat mode on, same distribution
    assert loading.is_compat(compat)
    for text in TEXTS:
        tokens = bridge.to_tokens(text)
        with torch.no_grad():
            want = hf(tokens).logits
            torch.testing.assert_close(bridge(tokens), want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(torch.log_softmax(compat(tokens), -1), torch.log_softmax(want, -1),
                                       atol=1e-4, rtol=1e-4)


def test_hf_cache_layout_by_path_and_by_id(tmp_path, offline):
    repo = offline / "models--acme--tiny-opt"
    snap = repo / "snapshots" / "0123abcd"
    save_twin(snap, "opt", "trained")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    want = plain_hf(snap, "opt")
    tokens = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        ref = want(tokens).logits
    for source in (snap, repo, "acme/tiny-opt"):  # the snapshot, the repo folder, the HF id found in the cache
        bridge = factlens.load(source, device="cpu", compat=False)
        with torch.no_grad():
            torch.testing.assert_close(bridge(tokens), ref, atol=1e-5, rtol=1e-5)
    assert loading.snapshot_folder(repo) == snap


def test_two_snapshots_need_a_revision(tmp_path, offline):
    repo = offline / "models--acme--two"
    for rev in ("aaaa", "bbbb"):
        (repo / "snapshots" / rev).mkdir(parents=True)
        (repo / "snapshots" / rev / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="revision"):
        loading.snapshot_folder(repo)
    assert loading.snapshot_folder(repo, "bbbb").name == "bbbb"


def test_unsupported_architecture_names_the_supported_ones(tmp_path, offline):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(UnknownModelError, match="llama") as err:
        factlens.load(folder)
    assert "'gpt2'" in str(err.value) and "'opt'" in str(err.value)


def test_folder_without_tokenizer_or_config(tmp_path, offline):
    folder = tmp_path / "weights_only"
    factlens.build_hf("gpt2").save_pretrained(folder)
    with pytest.raises(CheckpointError, match=r"tokenizer\.save_pretrained"):
        factlens.load(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        factlens.load(empty)


@pytest.mark.parametrize("name", ["gpt2", "openai-community/gpt2-medium", "facebook/opt-1.3b"])
def test_offline_empty_cache_names_three_ways_out(offline, name):
    with pytest.raises(CheckpointError) as err:
        factlens.load(name)
    msg = str(err.value)
    for way in ("HF cache", "local folder", "tiny-gpt2", "random-gpt2", "factlens.tiny"):
        assert way in msg


def test_cli_offline_empty_cache_prints_a_factlens_error(offline, tmp_path, capsys):
    from factlens.cli import main

    assert main(["capitals", "analyze", "--model", "gpt2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "CheckpointError" in err and "tiny-gpt2" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written before the model loaded


def test_cli_model_takes_a_folder(tmp_path, offline):
    from factlens.cli.capitals import build_model

    folder = tmp_path / "ckpt"
    save_twin(folder, "gpt2")
    bridge = build_model(str(folder), "cpu")
    assert loading.is_compat(bridge) and not loading.is_twin(bridge)
    assert loading.is_twin(build_model("tiny-gpt2", "cpu"))


def test_unknown_short_name_lists_choices():
    with pytest.raises(UnknownModelError, match="gpt2-medium"):
        factlens.load("gpt5")


def test_bridge_from_hf_uses_the_models_own_tokenizer(tmp_path, offline):
    folder = tmp_path / "ckpt"
    save_twin(folder, "opt", "trained")
    hf = OPTForCausalLM.from_pretrained(folder)  # not factlens-built: its tokenizer comes from its folder
    bridge = factlens.bridge_from_hf(hf)
    assert bridge.to_tokens(TEXTS[0], prepend_bos=False)[0].tolist() == \
        AutoTokenizer.from_pretrained(folder)(TEXTS[0])["input_ids"]
    shutil.rmtree(folder)  # the folder is gone: no silent substitution of factlens's BPE
    with pytest.raises(ConfigError, match="tokenizer"):
        factlens.bridge_from_hf(hf)
    twin = factlens.bridge_from_hf(factlens.build_hf("opt"))  # factlens's own random model: factlens's BPE
    assert twin.to_tokens(" Paris").tolist() == [opt_style_tokenizer()(" Paris")["input_ids"]]


def test_twins_and_loaded_models_share_the_compat_rule():
    from factlens import recall

    assert loading.is_compat(factlens.tiny("gpt2")) and loading.is_twin(factlens.tiny("opt"))
    raw = factlens.tiny("gpt2", compat=False)
    with pytest.raises(ModeError, match="enable_compatibility_mode"):
        recall.logit_lens(raw, recall.dataset_for(raw, n=4), progress=False)
    raw.enable_compatibility_mode()  # the fix the message names
    recall.logit_lens(raw, recall.dataset_for(raw, n=4), progress=False)
