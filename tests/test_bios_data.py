"""Synthetic-biography data: pools, templates, population, task tokenizer and batches (CPU, fast)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from factlens.bios import (
    ATTRIBUTES,
    BOS_ID,
    EOS_ID,
    N_TEMPLATES,
    PAD_ID,
    TEMPLATES,
    UNK_ID,
    BiographyBatch,
    BiographyStream,
    BiosVocab,
    Pools,
    Population,
    Uniform,
    eval_batches,
    make_batch,
    no_knowledge_baseline,
    pool_size,
)
from factlens.bios.data.pools import DATA_DIR, PAPER_SIZES
from factlens.bios.data.templates import check_templates, render_template, template_parts
from factlens.errors import CheckpointError, ConfigError

SEQ_LEN = 128


@pytest.fixture(scope="module")
def vocab() -> BiosVocab:
    return BiosVocab.default()


@pytest.fixture(scope="module")
def pop() -> Population:
    return Population.generate(2000, seed=0)


def render_biography(population: Population, batch: BiographyBatch, i: int) -> str:
    """The text a batch row should hold, rebuilt from its recorded template choices and value positions."""
    order = np.argsort(batch.value_start[i].numpy())  # sentence order = order of the values in the sequence
    person = int(batch.people[i])
    facts = list(population.facts(person).values())
    return " ".join(
        render_template(a, int(batch.templates[i, a]), population.full_name(person), facts[a]) for a in order
    )


# --- pools --------------------------------------------------------------------------------------------
def test_default_pools_have_paper_sizes_and_clean_items():
    pools = Pools.default()
    for name, n in PAPER_SIZES.items():
        items = getattr(pools, name)
        assert len(items) == n == len(set(items)), name
        assert all(x.isascii() and not any(c.isdigit() for c in x) for x in items), name
        assert all(re.fullmatch(r"[A-Za-z][A-Za-z ,'&-]*", x) and "  " not in x for x in items), name
        lines = (DATA_DIR / f"{name}.txt").read_text().splitlines()
        assert tuple(lines) == items
    assert pools.pool_size("birth_place") == pools.pool_size("current_location") == 800
    assert pool_size("birth_date") == 31 * 12 * 201
    assert pools.years[0] == 1900 and pools.years[-1] == 2100
    sources = (DATA_DIR / "SOURCES.md").read_text()
    assert all(f"{name}.txt" in sources for name in PAPER_SIZES)
    assert "CC BY 4.0" in sources and "GeoNames" in sources


def test_no_knowledge_baseline_is_mean_log_pool_size():
    pools = Pools.default()
    expected = (
        2 * math.log(800) + math.log(200) + math.log(100) + math.log(500) + math.log(31 * 12 * 201)
    ) / 6
    assert no_knowledge_baseline(pools) == pytest.approx(expected, abs=1e-12)
    assert round(no_knowledge_baseline(pools), 3) == 6.785
    small = Pools.sized(cities=10, universities=4, majors=3, companies=2, years=5)
    assert no_knowledge_baseline(small) == pytest.approx(
        np.mean([math.log(31 * 12 * 5), math.log(10), math.log(4), math.log(3), math.log(2), math.log(10)])
    )


def test_dates_render_like_the_paper_and_allow_impossible_days():
    pools = Pools.default()
    assert pools.render("birth_date", pools.date_index(16, 3, 2042)) == "March 16, 2042"
    assert pools.render("birth_date", pools.date_index(31, 2, 1900)) == "February 31, 1900"
    idx = np.arange(pools.pool_size("birth_date"))
    d, m, y = pools.date_parts(idx)
    assert d.max() == 30 and m.max() == 11 and y.max() == 200 and len(set(zip(d, m, y))) == len(idx)


def test_cut_date_pool_draws_renders_tokenizes_and_roundtrips(tmp_path):
    pools = Pools.sized(cities=5, universities=5, majors=5, companies=5, years=1, days=2)
    assert pools.pool_size("birth_date") == 24
    assert no_knowledge_baseline(pools) == pytest.approx(np.mean([math.log(24)] + [math.log(5)] * 5))
    assert pools.fingerprint() != Pools.sized(cities=5, universities=5, majors=5, companies=5, years=1).fingerprint()
    idx = np.arange(24)
    d, m, y = pools.date_parts(idx)
    assert set(d) == {0, 1} and set(m) == set(range(12)) and set(y) == {0}
    assert [pools.render("birth_date", pools.date_index(dd + 1, mm + 1, 1900)) for dd, mm in zip(d[:3], m[:3])] == [
        "January 1, 1900", "January 2, 1900", "February 1, 1900"]
    with pytest.raises(ConfigError, match=r"day 1\.\.2"):
        pools.date_index(3, 1, 1900)
    pop = Population.generate(300, seed=0, pools=pools)
    days = pop.dates[:, 0]
    assert set(days.tolist()) == {0, 1} and len(set(pop.values[:, 0].tolist())) == 24  # every date drawn
    vocab = BiosVocab(pools)
    batch = make_batch(pop, vocab, np.arange(8), rng=np.random.default_rng(0), seq_len=vocab.max_biography_tokens())
    for i in range(8):
        n = int(batch.attention_mask[i].sum())
        assert batch.tokens[i, 1 : n - 1].tolist() == vocab.encode(render_biography(pop, batch, i))
    back = Population.load(pop.save(tmp_path / "pop.npz"))
    assert back.pools == pools and np.array_equal(back.values, pop.values)
    with pytest.raises(ConfigError, match="days=0"):
        Pools.sized(days=0)
    with pytest.raises(ConfigError, match="days=32"):
        Pools.sized(days=32)


def test_bad_pools_raise_config_error():
    with pytest.raises(ConfigError, match="out of range"):
        Pools.sized(cities=801)
    base = Pools.sized(cities=3)
    with pytest.raises(ConfigError, match="unique"):
        dataclasses.replace(base, cities=("Paris", "Paris"))
    with pytest.raises(ConfigError, match="ASCII"):
        dataclasses.replace(base, majors=("Physics 101",))


# --- templates ----------------------------------------------------------------------------------------
def test_templates_follow_the_layout_rules():
    check_templates()
    assert tuple(TEMPLATES) == ATTRIBUTES
    for attr, group in TEMPLATES.items():
        assert len(group) == N_TEMPLATES == len(set(group)), attr
        for t, template in enumerate(group):
            assert template.count("{name}") == 1 and template.endswith("{value}.")
            assert template.index("{name}") < template.index("{value}")
            prefix, middle, suffix = template_parts(attr, t)
            assert suffix == "." and (prefix or middle)
            words = set(re.findall(r"[a-z]+", template.lower()))
            assert not words & {"he", "she", "his", "her", "they", "their", "him", "them"}
    all_templates = [t for group in TEMPLATES.values() for t in group]
    assert len(set(all_templates)) == 6 * N_TEMPLATES


@pytest.mark.parametrize(
    "bad",
    ["{value} is where {name} lives.", "{name} lives in {value} today.", "{name} says he lives in {value}."],
)
def test_check_templates_rejects_bad_layouts(bad):
    broken = {a: list(g) for a, g in TEMPLATES.items()}
    broken["current_location"][0] = bad
    with pytest.raises(ConfigError):
        check_templates({a: tuple(g) for a, g in broken.items()})


# --- population ---------------------------------------------------------------------------------------
def test_population_shapes_uniqueness_and_template_split(pop):
    n = len(pop)
    assert pop.names.shape == (n, 3) and pop.values.shape == (n, 6)
    assert pop.train_templates.shape == (n, 6, 20) and pop.eval_templates.shape == (n, 6, 5)
    assert len(np.unique(pop.name_codes())) == n
    sizes = np.array(pop.pools.pool_sizes)
    assert (pop.values >= 0).all() and (pop.values < sizes).all()
    both = np.sort(np.concatenate([pop.train_templates, pop.eval_templates], -1), -1)
    assert (both == np.arange(N_TEMPLATES)).all()  # a partition of the 25 templates
    assert len({tuple(x) for x in pop.eval_templates[:, 0]}) > n // 2  # the split differs between people


def test_population_values_are_uniform_and_independent():
    big = Population.generate(65536, seed=3)
    for a, attr in enumerate(ATTRIBUTES[1:], start=1):
        counts = np.bincount(big.values[:, a], minlength=big.pools.pool_size(a))
        expected = len(big) / len(counts)
        chi2 = ((counts - expected) ** 2 / expected).sum()
        df = len(counts) - 1
        assert chi2 < df + 5 * math.sqrt(2 * df), attr
    d, m, _ = big.dates.T
    assert ((d == 30) & (m == 1)).any()  # 31 February occurs
    assert abs(np.corrcoef(big.values[:, 1], big.values[:, 5])[0, 1]) < 0.02


def test_population_generation_is_deterministic():
    t0 = time.perf_counter()
    a = Population.generate(65536, seed=7)
    print(f"\nPopulation.generate(65536): {(time.perf_counter() - t0) * 1e3:.0f} ms")  # timing is reported, not asserted
    b = Population.generate(65536, seed=7)
    assert a.equals(b)
    assert not a.equals(Population.generate(65536, seed=8))


def test_name_space_limit_raises_and_dense_draws_stay_unique():
    tiny = Pools.sized(first_names=2, last_names=3)
    full = Population.generate(12, seed=0, pools=tiny)
    assert sorted(full.name_codes()) == list(range(12))
    with pytest.raises(ConfigError, match="n_people <= 12"):
        Population.generate(13, seed=0, pools=tiny)
    with pytest.raises(ConfigError, match="n_people"):
        Population.generate(0)
    with pytest.raises(ConfigError, match="n_train_templates"):
        Population.generate(5, n_train_templates=25)


def test_unseen_people_are_disjoint_and_concatenate(pop):
    new = pop.unseen(500, seed=1)
    assert not set(pop.name_codes()) & set(new.name_codes())
    both = Population.concatenate([pop, new])
    assert len(both) == len(pop) + 500
    assert both.full_name(len(pop) + 3) == new.full_name(3)
    assert (both.values[len(pop) :] == new.values).all()
    with pytest.raises(ConfigError, match="share full names"):
        Population.concatenate([pop, pop])
    tiny = Pools.sized(first_names=2, last_names=3)
    with pytest.raises(ConfigError):
        Population.generate(10, pools=tiny).unseen(3, seed=1)


def test_save_load_roundtrip_is_atomic_and_pickle_free(pop, tmp_path):
    path = pop.save(tmp_path / "sub" / "pop.npz")
    assert sorted(p.name for p in path.parent.iterdir()) == ["pop.npz"]  # no temp file left behind
    with np.load(path, allow_pickle=False) as z:
        assert "names" in z.files
    back = Population.load(path)
    assert back.equals(pop) and back.seed == pop.seed and back.pools == pop.pools
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError):
        Population.load(tmp_path / "bad.npz")
    with pytest.raises(CheckpointError):
        Population.load(tmp_path / "missing.npz")


def test_person_text_names_the_person_in_every_sentence(pop):
    text = pop.person_text(5)
    assert text.count(pop.full_name(5)) == 6 and text.count(".") >= 6
    assert all(value in text for value in pop.facts(5).values())


# --- vocabulary ---------------------------------------------------------------------------------------
def test_vocab_specials_and_coverage(vocab, pop):
    print(f"\ntask vocab size: {vocab.size}; longest biography: {vocab.max_biography_tokens()} tokens")
    assert (vocab.id("<pad>"), vocab.id("<bos>"), vocab.id("<eos>"), vocab.id("<unk>")) == (0, 1, 2, 3)
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert 3000 < vocab.size < 6000
    for i in range(50):
        assert UNK_ID not in vocab.encode(pop.person_text(i))
    assert vocab.encode("Zyzzyva") == [UNK_ID]
    assert vocab.max_biography_tokens() <= SEQ_LEN


def test_hf_tokenizer_directory_roundtrips_ids(vocab, pop, tmp_path):
    directory = vocab.save_pretrained(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(str(directory))
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    for i in range(20):
        text = pop.person_text(i)
        ids = vocab.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == vocab.decode(ids)
    assert hf("<bos>" + pop.person_text(0))["input_ids"][:2] == [BOS_ID, vocab.encode(pop.person_text(0))[0]]
    cached = vocab.hf_tokenizer()
    assert cached.encode(pop.person_text(3), add_special_tokens=False) == vocab.encode(pop.person_text(3))
    assert len(cached) == vocab.size


# --- batches ------------------------------------------------------------------------------------------
def test_batch_tokens_equal_tokenized_text_so_values_never_merge(pop, vocab):
    batch = make_batch(pop, vocab, np.arange(64), rng=np.random.default_rng(0), seq_len=SEQ_LEN)
    assert batch.tokens.shape == (64, SEQ_LEN)
    for i in range(64):
        n = int(batch.attention_mask[i].sum())
        row = batch.tokens[i].tolist()
        assert row[0] == BOS_ID and row[n - 1] == EOS_ID and set(row[n:]) <= {PAD_ID}
        assert row[1 : n - 1] == vocab.encode(render_biography(pop, batch, i))
    assert batch.attention_mask.sum(1).min() > 40


def test_masks_mark_exactly_values_and_names(pop, vocab):
    batch = make_batch(pop, vocab, np.arange(100, 164), rng=np.random.default_rng(1), seq_len=SEQ_LEN)
    dot = vocab.id(".")
    for i in range(len(batch)):
        person = int(batch.people[i])
        facts = list(pop.facts(person).values())
        expected_attr = torch.full((SEQ_LEN,), -1)
        for a in range(6):
            start, length = int(batch.value_start[i, a]), int(batch.value_len[i, a])
            ids = vocab.token_ids(facts[a])
            assert batch.tokens[i, start : start + length].tolist() == ids
            assert length == len(ids)
            assert int(batch.tokens[i, start + length]) == dot  # the value ends the sentence
            _, middle, _ = template_parts(a, int(batch.templates[i, a]))
            assert batch.tokens[i, start - 1].item() == vocab.token_ids(middle)[-1]  # wording right before
            expected_attr[start : start + length] = a
        assert torch.equal(batch.value_attr[i], expected_attr)
        name_ids = vocab.token_ids(pop.full_name(person))
        assert batch.tokens[i][batch.name_mask[i]].tolist() == name_ids * 6
    assert not (batch.name_mask & (batch.value_attr >= 0)).any()
    assert (
        torch.equal(batch.loss_mask[:, 1:], batch.attention_mask[:, 1:]) and not batch.loss_mask[:, 0].any()
    )


def test_held_out_templates_never_appear_in_training(pop, vocab):
    stream = BiographyStream(pop, vocab, Uniform(len(pop)), batch_size=256, seq_len=SEQ_LEN, seed=0)
    for step in range(20):
        batch = stream.batch(step)
        people = batch.people.numpy()
        used = batch.templates.numpy()[:, :, None]
        assert (used == pop.train_templates[people]).any(-1).all()
        assert not (used == pop.eval_templates[people]).any(-1).any()
    for batch in eval_batches(pop, vocab, n_sequences=512, batch_size=128, seq_len=SEQ_LEN):
        people = batch.people.numpy()
        used = batch.templates.numpy()[:, :, None]
        assert (used == pop.eval_templates[people]).any(-1).all()
        assert not (used == pop.train_templates[people]).any(-1).any()


def test_sentence_order_is_permuted_unless_disabled(pop, vocab):
    shuffled = make_batch(pop, vocab, np.zeros(200, dtype=np.int64), rng=np.random.default_rng(0))
    orders = {tuple(np.argsort(r)) for r in shuffled.value_start.numpy()}
    assert len(orders) > 100
    fixed = make_batch(pop, vocab, np.arange(50), rng=np.random.default_rng(0), permute=False)
    assert (np.diff(fixed.value_start.numpy(), axis=1) > 0).all()


def test_stream_is_a_pure_function_of_seed_and_step(pop, vocab):
    make = lambda seed: BiographyStream(pop, vocab, Uniform(len(pop)), 32, SEQ_LEN, seed=seed)  # noqa: E731
    a, b = make(0), make(0)
    for step in (0, 5, 1234):
        x, y = a.batch(step), b.batch(step)
        assert all(torch.equal(getattr(x, f), getattr(y, f)) for f in x.__dataclass_fields__)
    assert not torch.equal(a.batch(1).tokens, a.batch(2).tokens)
    assert not torch.equal(a.batch(1).tokens, make(1).batch(1).tokens)


def _digest_snippet() -> str:
    return (
        "import hashlib, numpy as np\n"
        "from factlens.bios import BiographyStream, BiosVocab, Population, PowerLaw\n"
        "pop = Population.generate(3000, seed=11)\n"
        "s = BiographyStream(pop, BiosVocab.default(), PowerLaw(3000, 0.6), 64, 128, seed=5)\n"
        "h = hashlib.sha256(pop.names.tobytes() + pop.values.tobytes() + pop.train_templates.tobytes())\n"
        "for step in (0, 7, 999):\n"
        "    h.update(s.batch(step).tokens.numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )


def test_token_stream_is_byte_identical_across_processes():
    here: dict = {}
    exec(_digest_snippet().replace("print(h.hexdigest())", "out = h.hexdigest()"), here)
    other = subprocess.run(
        [sys.executable, "-c", _digest_snippet()],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert other.stdout.strip() == here["out"]


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shards_concatenate_to_the_global_batch(pop, vocab, world_size):
    stream = BiographyStream(pop, vocab, Uniform(len(pop)), batch_size=64, seq_len=SEQ_LEN, seed=3)
    for step in (0, 17):
        whole = stream.batch(step)
        parts = BiographyBatch.cat(
            [stream.batch(step, rank=r, world_size=world_size) for r in range(world_size)]
        )
        assert all(torch.equal(getattr(whole, f), getattr(parts, f)) for f in whole.__dataclass_fields__)
    with pytest.raises(ConfigError, match="divisible"):
        stream.batch(0, rank=0, world_size=3)


def test_batch_errors_name_the_fix(pop, vocab):
    with pytest.raises(ConfigError, match="seq_len >="):
        make_batch(pop, vocab, np.arange(4), seq_len=40)
    with pytest.raises(ConfigError, match="seq_len >="):
        BiographyStream(pop, vocab, Uniform(len(pop)), 8, seq_len=64)
    with pytest.raises(ConfigError, match="n=2000"):
        BiographyStream(pop, vocab, Uniform(10), 8, SEQ_LEN)
    with pytest.raises(ConfigError, match="split"):
        make_batch(pop, vocab, np.arange(4), split="test")
    with pytest.raises(ConfigError, match="person indices"):
        make_batch(pop, vocab, np.array([len(pop)]))
    small = Population.generate(10, pools=Pools.sized(cities=5))
    with pytest.raises(ConfigError, match="different pools"):
        make_batch(small, vocab, np.arange(2))


def test_eval_batches_are_fixed_and_cover_people_without_replacement(pop, vocab):
    a = eval_batches(pop, vocab, n_sequences=300, batch_size=128, seed=4)
    b = eval_batches(pop, vocab, n_sequences=300, batch_size=128, seed=4)
    assert [len(x) for x in a] == [128, 128, 44]
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, b))
    people = torch.cat([x.people for x in a])
    assert len(set(people.tolist())) == 300


def test_batch_to_device_and_build_speed(vocab):
    big = Population.generate(65536, seed=0)
    stream = BiographyStream(big, vocab, Uniform(len(big)), batch_size=128, seq_len=SEQ_LEN, seed=0)
    stream.batch(0)
    times = []
    for step in range(100):
        t0 = time.perf_counter()
        batch = stream.batch(step)
        times.append(time.perf_counter() - t0)
    mean_len = batch.attention_mask.sum(1).float().mean().item()
    print(
        f"\nbatch build 128 x {SEQ_LEN} (mean {mean_len:.0f} real tokens), 64k people: "
        f"median {np.median(times) * 1e3:.2f} ms, p90 {np.percentile(times, 90) * 1e3:.2f} ms"
    )
    moved = batch.to("cpu")
    assert moved.tokens.dtype == torch.int64 and moved.attention_mask.dtype == torch.bool
    digest = hashlib.sha256(moved.tokens.numpy().tobytes()).hexdigest()
    assert digest == hashlib.sha256(batch.tokens.numpy().tobytes()).hexdigest()
