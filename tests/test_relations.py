"""Tests for factlens.recall.relations: prompts, tokenization conventions, named positions, errors."""

from __future__ import annotations

import pytest
import torch

from factlens.errors import ConfigError, EmptyDatasetError, TokenizationError
from factlens.recall.datasets import make_dataset, make_prompt_dataset
from factlens.recall.relations import (
    CAPITAL_LEAD_INS,
    CAPITALS,
    CAPITALS_APPENDIX,
    make_relation,
    with_lead_in,
)
from factlens.tokenizers import gpt2_tokenizer, opt_style_tokenizer


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def opt():
    return opt_style_tokenizer()


def _tok_at(ds, i, name):
    return ds.tokenizer.decode([int(ds.tokens[i, ds.positions[name][i]])])


def test_capitals_data_and_templates():
    assert len(CAPITALS.pairs) == 15 and len(CAPITALS.templates) == 15
    assert CAPITALS.answer_of("Thailand") == "Bangkok" and CAPITALS.answer_of("USA") == "Washington"
    assert "We confirm that the capital of {subject} is" in CAPITALS.templates
    assert "Don't forget, the capital of {subject} is" in CAPITALS.templates
    assert "Therefore, it's correct to state that the capital of {subject} is" in CAPITALS.templates
    assert not any(",," in t or "that," in t for t in CAPITALS.templates)
    assert "In case you didn't know, {subject}'s capital is" in CAPITALS_APPENDIX.templates
    assert CAPITALS.lead_ins == CAPITAL_LEAD_INS
    assert with_lead_in("Honestly", "the x of {subject} is") == "Honestly, the x of {subject} is"
    assert with_lead_in("", "the x of {subject} is") == "The x of {subject} is"


def test_zero_shot_has_225_distinct_prompts(gpt2):
    ds = make_dataset(CAPITALS, gpt2)
    assert len(ds) == 225 and len(set(ds.prompts)) == 225
    assert ds.prompts[0] == "It's crucial to know that the capital of China is"
    assert all(p.endswith(" is") for p in ds.prompts)


@pytest.mark.parametrize("tok_name", ["gpt2", "opt"])
@pytest.mark.parametrize("shots", [0, 1, 2])
@pytest.mark.parametrize("variant", ["main", "appendix"])
def test_positions_decode_to_the_right_tokens(request, tok_name, shots, variant):
    tok = request.getfixturevalue(tok_name)
    ds = make_dataset(CAPITALS, tok, shots=shots, seed=7, variant=variant)
    assert len(ds) == 225
    bos = 1 if tok_name == "opt" else 0
    assert ds.n_special_prefix == bos
    for i in range(len(ds)):
        subject = ds.subjects[i]
        assert _tok_at(ds, i, "N") == " " + subject
        assert ds.positions["N_last"][i] == ds.positions["N"][i]
        assert _tok_at(ds, i, "R") == " capital"
        assert _tok_at(ds, i, "end") == " is"
        assert ds.positions["end"][i] == ds.lengths[i] - 1
        assert _tok_at(ds, i, "N-1") == (" of" if variant == "main" else ds.tokenizer.decode(
            [int(ds.tokens[i, ds.positions["N"][i] - 1])]))
        if variant == "appendix":
            assert ds.positions["R"][i] == ds.positions["N"][i] + 2  # "France" "'s" " capital"
        else:
            assert ds.positions["R"][i] == ds.positions["N"][i] - 2  # " capital" " of" " France"
        # N is in the query: after every demonstration, and the demos never mention the subject
        assert len(ds.specs[i].shot_subjects) == shots and subject not in ds.specs[i].shot_subjects
        assert ds.prompts[i].count(subject) == 1
        if shots:
            demo_end = ds.tokenizer(ds.prompts[i].rsplit(". ", 1)[0], add_special_tokens=False)["input_ids"]
            assert ds.positions["N"][i] >= len(demo_end) + bos
    assert (ds.positions["starts"] == 0).all()
    if bos:
        assert (ds.tokens[:, 0] == tok.bos_token_id).all()


def test_opt_bos_shifts_positions_by_one(gpt2, opt):
    a, b = make_dataset(CAPITALS, gpt2, shots=1, seed=3), make_dataset(CAPITALS, opt, shots=1, seed=3)
    assert a.prompts == b.prompts
    for name in ("N", "N-1", "R", "end"):
        assert torch.equal(a.positions[name] + 1, b.positions[name])
    assert torch.equal(a.lengths + 1, b.lengths)
    assert torch.equal(a.answer_ids, b.answer_ids)  # same BPE ids in the OPT-style tokenizer


def test_one_shot_example_matches_notes(gpt2):
    ds = make_dataset(CAPITALS, gpt2, shots=1, seed=0)
    assert all(p.startswith("The capital of ") for p in ds.prompts)
    row = next(i for i, s in enumerate(ds.specs)
               if s.subject == "France" and ds.relation.templates[s.template_idx].startswith("Don't forget"))
    demo = ds.specs[row].shot_subjects[0]
    expected = f"The capital of {demo} is {CAPITALS.answer_of(demo)}. Don't forget, the capital of France is"
    assert ds.prompts[row] == expected
    assert int(ds.lengths[row]) == 16  # notes §2.1: the 1-shot example is 16 tokens
    assert make_dataset(CAPITALS, gpt2, shots=1, seed=0).prompts == ds.prompts  # seeded
    assert make_dataset(CAPITALS, gpt2, shots=1, seed=1).prompts != ds.prompts


def test_answer_and_subject_ids(gpt2):
    ds = make_dataset(CAPITALS, gpt2)
    by_answer = dict(zip(ds.answers, ds.answer_ids.tolist()))
    assert by_answer["Paris"] == 6342 and by_answer["Tokyo"] == 11790 and by_answer["Rome"] == 10598
    assert by_answer["London"] == 3576 and by_answer["Beijing"] == 11618
    for s, sid in zip(ds.subjects, ds.subject_ids.tolist()):
        assert gpt2.decode([sid]) == " " + s


def test_right_padding_and_mask(gpt2, opt):
    for tok in (gpt2, opt):
        ds = make_dataset(CAPITALS, tok, shots=2, seed=1)
        width = ds.tokens.shape[1]
        assert width == int(ds.lengths.max())
        assert int(ds.lengths.min()) < width  # templates differ in length
        arange = torch.arange(width)[None, :]
        assert torch.equal(ds.attention_mask.bool(), arange < ds.lengths[:, None])
        assert (ds.tokens[~ds.attention_mask.bool()] == tok.pad_token_id).all()
        ids = tok(ds.prompts[0])["input_ids"]
        assert ds.tokens[0, : len(ids)].tolist() == ids


def test_subset_all_same_country(gpt2):
    ds = make_dataset(CAPITALS, gpt2)
    fr = ds.subset("France")
    assert len(fr) == 15 and set(fr.subjects) == {"France"}
    assert sorted(fr.template_ids.tolist()) == list(range(15))
    assert (fr.answer_ids == 6342).all()
    with pytest.raises(ConfigError):
        ds.subset("Narnia")
    with pytest.raises(EmptyDatasetError):
        make_dataset(CAPITALS, gpt2, subjects=["Japan"]).subset("France")


def test_counterfactual_keeps_templates_and_swaps_subjects(gpt2, opt):
    for tok in (gpt2, opt):
        ds = make_dataset(CAPITALS, tok, shots=2, seed=4)
        new = ds.counterfactual(seed=5)
        assert len(new) == len(ds)
        assert torch.equal(new.template_ids, ds.template_ids)
        for a, b in zip(ds.specs, new.specs):
            assert a.shot_subjects == b.shot_subjects and a.subject != b.subject
            assert b.subject not in b.shot_subjects and b.answer == CAPITALS.answer_of(b.subject)
        for i in range(len(new)):
            assert _tok_at(new, i, "N") == " " + new.subjects[i]
        assert torch.equal(new.positions["end"], ds.positions["end"])  # single-token swap keeps lengths
        assert new.counterfactual(seed=5).prompts != new.prompts
        assert ds.counterfactual(seed=5).prompts == new.prompts


def test_sampling_n_and_subjects(gpt2):
    ds = make_dataset(CAPITALS, gpt2, n=40, seed=2)
    assert len(ds) == 40 and len(set(ds.prompts)) == 40
    many = make_dataset(CAPITALS, gpt2, shots=1, n=500, seed=2)
    assert len(set(many.prompts)) == 500
    only = make_dataset(CAPITALS, gpt2, subjects=["Spain", "Egypt"], shots=1)
    assert len(only) == 30 and set(only.subjects) == {"Spain", "Egypt"}
    with pytest.raises(ConfigError, match="n <= 225"):
        make_dataset(CAPITALS, gpt2, n=226)
    df = ds.to_dataframe()
    assert len(df) == 40
    assert {"prompt", "subject", "answer_id", "pos_N", "pos_R", "pos_end"} <= set(df.columns)
    assert (df["answer_token"] == [" " + a for a in ds.answers]).all()


def test_errors(gpt2):
    with pytest.raises(ConfigError, match="shots <= 14"):
        make_dataset(CAPITALS, gpt2, shots=15)
    assert len(make_dataset(CAPITALS, gpt2, shots=14, n=5)) == 5
    with pytest.raises(TokenizationError, match="subject"):
        make_relation("bad", {"France": "Paris"}, "the capital is")
    with pytest.raises(EmptyDatasetError):
        make_relation("empty", {}, "the capital of {subject} is")
    with pytest.raises(EmptyDatasetError):
        make_dataset(CAPITALS, gpt2, subjects=[])
    with pytest.raises(EmptyDatasetError):
        make_prompt_dataset([], gpt2)
    with pytest.raises(ConfigError, match="appendix"):
        make_dataset(CAPITALS, gpt2, variant="nope")
    with pytest.raises(ConfigError):
        make_relation("x", {"France": "Paris"}, "the capital of {subject} is ")


def test_multi_token_answer_needs_first_piece(gpt2):
    rel = make_relation("bf", {"Mali": "Bamako", "Nigeria": "Abuja", "Chad": "Ouagadougou"},
                        "the capital of {subject} is", "The capital of {subject} is {answer}. ",
                        relation_word="capital")
    with pytest.raises(TokenizationError, match="first_piece=True"):
        make_dataset(rel, gpt2)
    ds = make_dataset(rel, gpt2, first_piece=True, shots=1)
    row = ds.subjects.index("Chad")
    assert gpt2.decode([int(ds.answer_ids[row])]) == " Ou"


def test_multi_token_subject_is_a_span(gpt2, opt):
    rel = make_relation("bf", {"Burkina Faso": "Paris", "France": "Paris"}, "the capital of {subject} is")
    with pytest.raises(TokenizationError, match="multi_token_subjects"):
        make_dataset(rel, gpt2)
    for tok in (gpt2, opt):
        ds = make_dataset(rel, tok, first_piece=True)
        i = ds.subjects.index("Burkina Faso")
        span = ds.tokens[i, ds.positions["N"][i]: ds.positions["N_last"][i] + 1]
        assert tok.decode(span) == " Burkina Faso"
        assert tok.decode([int(ds.tokens[i, ds.positions["N"][i] - 1])]) == " of"


def test_prompt_dataset_biographies(gpt2, opt):
    items = [("Ada Lovelace was born in", "Ada Lovelace", "London"),
             ("Alan Turing was born in", "Alan Turing", "London"),
             ("Everyone knows that Grace Hopper was born in", "Grace Hopper", "Washington")]
    for tok in (gpt2, opt):
        ds = make_prompt_dataset(items, tok, shot_template="{subject} was born in {answer}. ", shots=1,
                                 seed=0)
        for i, (_, subject, _) in enumerate(items):
            span = ds.tokens[i, ds.positions["N"][i]: ds.positions["N_last"][i] + 1]
            assert tok.decode(span).strip() == subject
            assert ds.specs[i].shot_subjects[0] != subject
            assert _tok_at(ds, i, "end") == " in"
        assert "R" not in ds.positions
        with pytest.raises(ConfigError, match="relation_word"):
            ds.position("R")
        cf = ds.counterfactual(seed=0)
        assert [s.template_idx for s in cf.specs] == [s.template_idx for s in ds.specs]
        assert all(a != b for a, b in zip(cf.subjects, ds.subjects))
    zero = make_prompt_dataset(items[:2], gpt2)
    assert "N-1" not in zero.positions  # subject is token 0 without a BOS
    with pytest.raises(ConfigError, match="N-1"):
        zero.position("N-1")
    assert "N-1" in make_prompt_dataset(items[:2], opt).positions  # OPT's BOS precedes it
    with pytest.raises(TokenizationError):
        make_prompt_dataset([("Someone was born in", "Ada Lovelace", "London")], gpt2)
    with pytest.raises(ConfigError, match="two answers"):
        make_prompt_dataset([items[0], ("Ada Lovelace lived in", "Ada Lovelace", "Paris")], gpt2)


# ------------------------------------------------------------------------- whole-word, NFC subject matching
def test_subject_inside_a_longer_word_is_not_the_subject(gpt2):
    """Issue 14 §8: "Niger" inside "Nigeria" is not the subject; the counterfactual swaps the subject only."""
    ds = make_prompt_dataset([("Unlike Nigeria, the capital of Niger is", "Niger", "Niamey"),
                              ("Unlike Nigeria, the capital of France is", "France", "Paris")], gpt2, first_piece=True)
    assert ds.relation.templates == ("Unlike Nigeria, the capital of {subject} is",)
    cf = ds.counterfactual(seed=0)
    assert cf.prompts == ["Unlike Nigeria, the capital of France is", "Unlike Nigeria, the capital of Niger is"]
    assert all("Franceia" not in p and "Nigeriaia" not in p for p in cf.prompts)


def test_subject_token_span_is_the_slot_not_an_earlier_word(gpt2):
    """" Franceia" tokenizes as [" France", "ia"]: the first token match is not the subject; the slot is."""
    assert gpt2.tokenize(" Franceia")[0] == "ĠFrance"
    ds = make_prompt_dataset([("Unlike Franceia, the capital of France is", "France", "Paris")], gpt2)
    n = int(ds.positions["N"][0])
    assert gpt2.decode(ds.tokens[0, :n + 1]) == "Unlike Franceia, the capital of France"
    with pytest.raises(TokenizationError, match="whole word"):
        make_prompt_dataset([("Unlike Franceia, the capital is", "France", "Paris")], gpt2)


def test_prompts_and_subjects_are_compared_in_nfc(gpt2):
    composed, decomposed = "Cura\u00e7ao", "Curac\u0327ao"
    assert composed != decomposed
    ds = make_prompt_dataset([(f"Welcome to {decomposed}, whose capital is", composed, "Willemstad")], gpt2,
                             first_piece=True)
    assert ds.subjects == [composed] and ds.prompts == [f"Welcome to {composed}, whose capital is"]
    rel = make_relation("c", {decomposed: "Willemstad"}, "the capital of {subject} is")
    assert rel.subjects == (composed,) and rel.answer_of(decomposed) == "Willemstad"
