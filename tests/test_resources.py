"""factlens.cache and factlens.resources: exact cache prediction, the memory guard, and memory reporting in training."""

from __future__ import annotations

import json
import mmap

import pytest
import torch

import factlens
from factlens import resources
from factlens.bios.trainer import PatchConfig, TrainConfig, Trainer, train
from factlens.cache import CacheEstimate, cache_nbytes, estimate_cache, pos_slice_indices, run_with_cache
from factlens.resources import (
    budget_bytes,
    check_fits,
    format_bytes,
    memory_usage,
    parse_bytes,
    saved_tensor_bytes,
    set_memory_budget,
)


@pytest.fixture(scope="module", params=[("gpt2", True), ("gpt2", False), ("opt", True)],
                ids=["gpt2-compat", "gpt2-raw", "opt-compat"])
def model(request):
    family, compat = request.param
    return factlens.tiny(family, compat=compat)


@pytest.mark.parametrize("batch,seq_len", [(1, 1), (2, 7), (5, 33)])
@pytest.mark.parametrize("names", [None, "patterns", ["blocks.0.attn.hook_z", "blocks.1.hook_resid_post"]])
def test_estimate_matches_the_real_cache(model, batch, seq_len, names):
    names_filter = (lambda n: n.endswith("hook_pattern")) if names == "patterns" else names
    est = estimate_cache(model, batch, seq_len, names_filter)
    tokens = torch.randint(0, 1000, (batch, seq_len))
    _, cache = model.run_with_cache(tokens, names_filter=names_filter)
    real = cache_nbytes(cache)
    assert abs(est.total - real) <= 1e-4 * real + 8, (est.total, real)
    assert set(est.per_hook) == set(cache.keys())


def test_patterns_scale_with_the_square_of_the_sequence(model):
    est = estimate_cache(model, 3, 50, names_filter=lambda n: n.endswith("hook_pattern"))
    cfg = model.cfg
    assert est.total == 3 * cfg.n_layers * cfg.n_heads * 50 * 50 * 4
    assert est.per_sequence * 3 == est.total


def test_guarded_run_equals_plain_run(model):
    tokens = torch.randint(0, 1000, (2, 9))
    logits, cache = run_with_cache(model, tokens, names_filter=lambda n: n.endswith("hook_z"))
    ref_logits, ref_cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
    torch.testing.assert_close(logits, ref_logits)
    assert set(cache.keys()) == set(ref_cache.keys())


def test_guard_suggests_a_batch_that_fits(model):
    tokens = torch.randint(0, 1000, (64, 16))
    est = estimate_cache(model, 64, 16)
    budget = est.total // 5
    with pytest.raises(factlens.ResourceError) as info:
        run_with_cache(model, tokens, budget=budget)
    fits = est.max_batch(budget)
    msg = str(info.value)
    assert f"at most {fits} sequences" in msg and "names_filter" in msg and format_bytes(est.total) in msg
    assert estimate_cache(model, fits, 16).total <= budget < estimate_cache(model, fits + 1, 16).total
    run_with_cache(model, tokens[:fits], budget=budget)  # the suggestion works


def test_budget_from_environment(monkeypatch, model):
    monkeypatch.setenv("FACTLENS_MEMORY_BUDGET", "2KiB")
    assert budget_bytes("cpu") == 2048
    with pytest.raises(factlens.ResourceError, match="the budget you set"):
        run_with_cache(model, torch.zeros(1, 8, dtype=torch.long))
    monkeypatch.delenv("FACTLENS_MEMORY_BUDGET")
    assert budget_bytes("cpu") > 2048


@pytest.mark.parametrize("text,expected", [("8GiB", 8 * 2**30), ("512 MB", 512 * 2**20), ("1e3", 1000),
                                           (4096, 4096), ("2k", 2048), ("1.5G", 3 * 2**29)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_check_fits_counts_against_free_memory():
    check_fits(1, "cpu", what="one byte", fixes=["none"])
    with pytest.raises(factlens.ResourceError, match="smaller batch"):
        check_fits(10**16, "cpu", what="ten petabytes", fixes=["a smaller batch"])


def test_memory_usage_reads_the_process():
    mem = memory_usage()
    assert 0 < mem.rss <= mem.peak_rss * 1.01 + 2**20
    assert set(mem.to_dict()) == {"rss_gib", "peak_rss_gib"}
    # Fresh anonymous pages, touched: no allocator can hand back memory that was already resident.
    size = 64 * 2**20
    with mmap.mmap(-1, size) as fresh:
        for offset in range(0, size, mmap.PAGESIZE):
            fresh[offset] = 1
        after = memory_usage()
    assert after.peak_rss >= mem.peak_rss
    assert after.rss >= mem.rss + 32 * 2**20


def _fake_cgroup(tmp_path, monkeypatch, levels: dict[str, dict[str, str]], proc_line: str):
    """A cgroup tree under ``tmp_path`` (v1 layout when ``proc_line`` names the memory controller)."""
    v1 = ":memory:" in proc_line
    root = tmp_path / ("memory" if v1 else "unified")
    for rel, files in levels.items():
        (root / rel).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (root / rel / name).write_text(text)
    layout = resources._CGROUP_LAYOUTS["v1" if v1 else "v2"]
    monkeypatch.setitem(resources._CGROUP_LAYOUTS, "v1" if v1 else "v2", ((str(root),), *layout[1:]))
    (tmp_path / "cgroup").write_text(proc_line + "\n")
    return tmp_path / "cgroup"


def test_cgroup_counts_page_cache_as_free(tmp_path, monkeypatch):
    gib = 2**30
    proc = _fake_cgroup(tmp_path, monkeypatch, {"job": {
        "memory.max": str(4 * gib), "memory.current": str(4 * gib - 10),
        "memory.stat": f"anon {gib}\nfile {3 * gib}\ninactive_file {2 * gib}\nactive_file {gib - 10}\n"}},
        "0::/job")
    assert resources._cgroup_available(proc) == 3 * gib  # 4 GiB limit − 1 GiB that cannot be reclaimed


def test_cgroup_parent_limit_binds_and_unlimited_is_none(tmp_path, monkeypatch):
    gib = 2**30
    levels = {"outer": {"memory.limit_in_bytes": str(2 * gib), "memory.usage_in_bytes": str(gib // 2),
                        "memory.stat": "total_inactive_file 0\ntotal_active_file 0\n"},
              "outer/inner": {"memory.limit_in_bytes": str(2**63 - 4096), "memory.usage_in_bytes": str(gib // 4)}}
    proc = _fake_cgroup(tmp_path, monkeypatch, levels, "4:memory:/outer/inner")
    assert resources._cgroup_available(proc) == 2 * gib - gib // 2
    v2 = _fake_cgroup(tmp_path / "v2", monkeypatch, {"job": {"memory.max": "max", "memory.current": "5"}}, "0::/job")
    assert resources._cgroup_available(v2) is None
    assert resources._cgroup_available(tmp_path / "missing") is None


def test_cache_estimate_summaries():
    est = CacheEstimate({"blocks.0.attn.hook_pattern": 300, "blocks.1.attn.hook_pattern": 300,
                         "blocks.0.hook_resid_post": 100, "hook_embed": 50}, batch=2, seq_len=4, per_sequence=375)
    assert est.total == 750
    assert est.largest(2) == [("attn.hook_pattern", 600), ("hook_resid_post", 100)]
    assert est.max_batch(1000) == 2
    assert est.to_dataframe()["share"].sum() == pytest.approx(1.0)


def test_trainer_refuses_a_run_that_cannot_fit_and_names_the_parts():
    set_memory_budget("64KiB")
    try:
        with pytest.raises(factlens.ResourceError) as info:
            Trainer(TrainConfig.preset("tiny"), "/tmp/factlens-never-written")
    finally:
        set_memory_budget(None)
    assert "weights + gradients + AdamW" in str(info.value) and "logits" in str(info.value)
    assert "activations saved for backward" in str(info.value)


def test_saved_tensor_bytes_counts_each_storage_once_and_skips_parameters():
    layer = torch.nn.Linear(8, 8)
    x = torch.ones(4, 8, requires_grad=True)

    def twice():
        h = layer(x)  # saves x (128 B) and the weight (a parameter: skipped)
        return h * h  # saves h twice: one storage, 128 B

    assert saved_tensor_bytes(twice, exclude=layer.parameters()) == 128 + 128
    assert saved_tensor_bytes(twice) == 128 + 128 + 8 * 8 * 4
    with torch.no_grad():
        assert saved_tensor_bytes(twice) == 0


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_trainer_predicts_saved_activations(tmp_path, arch):
    trainer = Trainer(TrainConfig.preset("tiny", arch=arch), tmp_path, progress=False)
    rng = torch.get_rng_state()
    one, two = trainer._measure_saved_bytes(1), trainer._measure_saved_bytes(2)
    assert torch.equal(torch.get_rng_state(), rng)  # the probe leaves the training run's randomness alone
    assert trainer.raw_model.training
    for batch in (8, 32):
        measured = trainer._measure_saved_bytes(batch)
        predicted = one + (two - one) * (batch - 1)
        assert measured <= predicted <= measured * 1.001
    est = trainer.memory_estimate()
    assert est["activations saved for backward"] == one + (two - one) * (trainer.config.batch_size - 1)
    # the activations dominate the weights even at this size: a check without them would miss most of the run
    assert est["activations saved for backward"] > est["weights + gradients + AdamW"]


def test_trainer_estimate_counts_reference_patterns(tmp_path):
    cfg = TrainConfig.preset("tiny", steps=2)
    trainer = Trainer(cfg, tmp_path / "a", progress=False)
    est = trainer.memory_estimate()
    n_params = sum(p.numel() for p in trainer.raw_model.parameters())
    assert est["weights + gradients + AdamW"] == 16 * n_params
    assert est["logits (copies and gradients in the loss)"] == 16 * cfg.batch_size * trainer.seq_len * trainer.vocab.size
    assert "reference patterns" not in est
    train(cfg, tmp_path / "ref", progress=False)
    patched = TrainConfig.preset("tiny", steps=2, patch=PatchConfig(str(tmp_path / "ref"), reference_step=2))
    est = Trainer(patched, tmp_path / "b", progress=False).memory_estimate()
    m = cfg.model
    assert est["reference patterns"] == 4 * cfg.batch_size * m["n_layer"] * m["n_head"] * trainer.seq_len ** 2
    assert est["reference model"] == 4 * n_params


def test_training_logs_memory(tmp_path):
    train(TrainConfig.preset("tiny", steps=10, log_every=5), tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if r["kind"] == "train"]
    assert len(logged) == 2
    assert all(0 < r["rss_gib"] <= r["peak_rss_gib"] * 1.01 + 1e-3 for r in logged)


# ------------------------------------------------------------------------------------------------ pos_slice
@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_pos_slice_estimate_equals_the_real_cache(tiny_models, arch):
    """Issue 14 §9: the prediction honours pos_slice, byte for byte, and the kept positions are the right ones
    (OPT's flattened ``ln2`` hooks included, which TL alone would slice along their feature axis)."""
    model = tiny_models[arch]
    model.eval()
    tokens = model.to_tokens(["The capital of France is the best", "Hello there my friends how are you"])
    _, full = model.run_with_cache(tokens)
    b, t = tokens.shape
    for pos_slice in (-1, 2, slice(0, 2), slice(-3, None), [0, 3]):
        kept = pos_slice_indices(pos_slice, t)
        for names in (None, lambda n: n.endswith("hook_pattern") or "ln2" in n or n.endswith("hook_z")):
            _, cache = run_with_cache(model, tokens, pos_slice=pos_slice, names_filter=names)
            est = estimate_cache(model, b, t, names, pos_slice=pos_slice)
            real = cache_nbytes(cache)  # as above: GPT-2's position ids are [1, pos] for any batch (a few bytes)
            assert abs(est.total - real) <= 1e-4 * real + 8, (pos_slice, names, est.total, real)
            assert set(est.per_hook) == set(cache.keys())
            # every entry is a copy of its kept positions, not a view that keeps the whole tensor alive
            assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in cache.values())
        for name in ("blocks.0.attn.hook_pattern", "blocks.1.ln2.hook_scale", "blocks.0.attn.hook_z"):
            ref = full[name]
            if name.endswith("hook_pattern"):
                ref = ref[:, :, kept]  # [b, h, q, k]: query positions
            else:
                flat = ref.ndim == 2 and ref.shape[0] == b * t  # OPT's ln2 hooks fire as [b·p, d]
                ref = (ref.reshape(b, t, ref.shape[-1]) if flat else ref)[:, kept]
            torch.testing.assert_close(cache[name], ref)


def test_pos_slice_makes_a_refused_cache_fit(tiny_models):
    model = tiny_models["gpt2"]
    tokens = model.to_tokens("The capital of France is").repeat(16, 1)
    whole = estimate_cache(model, 16, tokens.shape[1]).total
    with pytest.raises(factlens.ResourceError, match="pos_slice"):
        run_with_cache(model, tokens, budget=whole // 2)
    _, cache = run_with_cache(model, tokens, budget=whole // 2, pos_slice=-1)
    assert cache_nbytes(cache) < whole // 2
    assert cache["blocks.0.hook_resid_pre"].shape == (16, 1, model.cfg.d_model)
