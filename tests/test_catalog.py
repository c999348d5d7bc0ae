"""The ready relations: single-token subjects and answers in the real GPT-2 BPE, datasets on GPT-2 and OPT, CLI."""

from __future__ import annotations

import pytest

from factlens.errors import ConfigError
from factlens.recall.catalog import RELATIONS, relation
from factlens.recall.datasets import make_dataset
from factlens.tokenizers import gpt2_tokenizer, opt_style_tokenizer

NEW = ("languages", "currencies", "developers", "city-countries")


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def opt():
    return opt_style_tokenizer()


@pytest.mark.parametrize("name", sorted(RELATIONS))
def test_answers_and_subjects_are_single_gpt2_tokens(name, gpt2):
    rel = RELATIONS[name]
    assert len(rel.pairs) >= 12
    for subject, answer in rel.pairs:
        assert len(gpt2.encode(" " + answer)) == 1, (name, answer)
        assert len(gpt2.encode(" " + subject)) == 1, (name, subject)
    assert len(rel.templates) == 15 and rel.shot_template is not None


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("shots", [0, 2])
@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_datasets_build(name, shots, family, gpt2, opt):
    tok = gpt2 if family == "gpt2" else opt
    rel = relation(name)
    ds = make_dataset(rel, tok, shots=shots)
    assert len(ds) == len(rel.templates) * len(rel.pairs)
    for i in (0, len(ds) // 2, len(ds) - 1):
        subject = tok.decode(ds.tokens[i, ds.positions["N"][i]]).strip()
        answer = rel.answer_of(subject)
        assert tok.decode([int(ds.answer_ids[i])]) == " " + answer
        end = int(ds.positions["end"][i])
        assert tok.decode(ds.tokens[i, : end + 1]).replace("</s>", "") == ds.prompts[i]
        word = tok.decode(ds.tokens[i, ds.positions["R"][i]]).strip()
        assert word == rel.relation_word
        assert ds.prompts[i].count(rel.demo(subject)) == 0, "no demonstration gives the answer away"
    if family == "opt":
        assert (ds.tokens[:, 0] == tok.bos_token_id).all()


def test_unknown_relation_names_the_choices():
    with pytest.raises(ConfigError, match="city-countries"):
        relation("capital")


def test_cli_runs_the_report_on_a_new_relation(tmp_path):
    from factlens.cli import main

    assert main(["recall", "analyze", "--relation", "developers", "--model", "tiny-gpt2", "--out",
                 str(tmp_path)]) == 0
    assert (tmp_path / "report.html").exists()
    assert "is developed by" in (tmp_path / "report.html").read_text()
