"""Requests that cannot be honoured, ill-conditioned fits, colliding output folders and unchecked entry points.

Each refusal asserts the factlens error class and that the message names the fix; results are checked against
hand computations (numpy's condition number, the folder names a user would pick).
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import factlens
from factlens import recall
from factlens.bios.phases import check_plateau_ratio, plateau_end
from factlens.bios.run import Run
from factlens.cli import main
from factlens.cli.capitals import output_folders
from factlens.errors import ConfigError, IllConditionedWarning
from factlens.recall.regression import COND_WARN, check_ridge, fit_decomposition
from factlens.testbeds import mechanisms as mech

RUN = Path(__file__).parent / "data" / "bios_demo_run"


@pytest.fixture(scope="module")
def gpt2():
    return factlens.tiny("gpt2")


# ------------------------------------------------------------------------------------ impossible requests
@pytest.mark.parametrize("ridge", [float("nan"), float("inf"), -1e-3, -1.0, "0.1", None, True])
def test_a_ridge_that_is_not_a_finite_non_negative_number_is_refused(ridge, unchecked):
    h = torch.randn(8, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=r"pass a finite ridge >= 0"):
        fit_decomposition(h.sum(1), h, ridge=ridge)


@settings(max_examples=30, deadline=None)
@given(ridge=st.floats(allow_nan=True, allow_infinity=True))
def test_check_ridge_accepts_exactly_the_finite_non_negative_numbers(ridge):
    if math.isfinite(ridge) and ridge >= 0:
        assert check_ridge(ridge) == ridge
    else:
        with pytest.raises(ConfigError, match="finite ridge >= 0"):
            check_ridge(ridge)


def test_analysis_entry_points_refuse_a_bad_ridge_before_any_forward_pass(gpt2):
    ds = recall.dataset_for(gpt2).select(range(20))
    for call in (lambda: recall.fit_intercept(gpt2, ds, ridge=float("nan")),
                 lambda: recall.decompose_mlp(gpt2, ds, ridge=float("inf")),
                 lambda: recall.mitigation_table(gpt2, shots=[0], ridge=-1.0, progress=False)):
        with pytest.raises(ConfigError, match="finite ridge"):
            call()


@settings(max_examples=30, deadline=None)
@given(ratio=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 200)))
def test_a_plateau_ratio_must_be_a_fraction(ratio):
    if isinstance(ratio, float) and math.isfinite(ratio) and 0 < ratio < 1:
        assert check_plateau_ratio(ratio) == ratio
        return
    with pytest.raises(ConfigError, match=r"not in \(0, 1\).*such as 0\.98"):
        plateau_end([0, 100, 200], [8.0, 6.8, 6.0], baseline=6.785, ratio=ratio)


def test_reproduce_refuses_a_percentage_before_training(tmp_path):
    assert main(["bios", "reproduce", "--scale", "tiny", "--out", str(tmp_path / "r"), "--plateau-ratio", "98",
                 "--quiet"]) == 2
    assert not (tmp_path / "r").exists()
    from factlens.bios.reproduce import reproduce

    with pytest.raises(ConfigError, match="not a percentage"):
        reproduce("tiny", tmp_path / "r2", plateau_ratio=98)
    assert not (tmp_path / "r2").exists()


def test_mitigate_refuses_requests_that_apply_nothing_or_cannot_apply(gpt2, unchecked):
    with pytest.raises(ConfigError, match=r"applies nothing; pass intercept=c"), \
            recall.mitigate(gpt2, attention=False):
        pass
    c = torch.randn(gpt2.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=r"per-subject intercept dict.*evaluate\(model, dataset, intercept=\.\.\.\)"), \
            recall.mitigate(gpt2, intercept={"France": c}):
        pass
    with pytest.raises(ConfigError, match="coeff=nan"), recall.mitigate(gpt2, intercept=c, coeff=float("nan")):
        pass


def test_mechanisms_refuses_more_prompts_than_people():
    people = len(Run(RUN).population())
    with pytest.raises(ConfigError, match=f"the run has {people} people.*pass n <= {people}"):
        mech.mechanisms(RUN, attributes=["birth_place"], n=people + 1, progress=False)


def test_generate_refuses_no_new_tokens(gpt2):
    tokens = gpt2.to_tokens("The capital of France is")
    for n in (0, -3):
        with pytest.raises(ConfigError, match=r"max_new_tokens >= 1"):
            gpt2.generate(tokens, max_new_tokens=n, verbose=False)
    assert gpt2.generate(tokens, max_new_tokens=1, verbose=False, do_sample=False).shape[-1] == tokens.shape[-1] + 1


# ---------------------------------------------------------------------------------------- ill-conditioning
def collinear(eps: float, n: int = 40, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, dtype=torch.float64, generator=g)
    b = a + eps * torch.randn(n, d, dtype=torch.float64, generator=g)
    h = torch.stack([a, b, torch.randn(n, d, dtype=torch.float64, generator=g)], 1)  # [n, 3, d]
    y = h[:, 0] - 0.5 * h[:, 2] + 0.01 * torch.randn(n, d, dtype=torch.float64, generator=g)
    return y, h


def hand_condition(h: torch.Tensor) -> float:
    hc = (h - h.mean(0)).numpy()  # [n, k, d]
    G = np.einsum("nkd,njd->kj", hc, hc)
    return float(np.linalg.cond(G))


def test_a_nearly_collinear_regression_warns_and_reports_its_condition_number():
    y, h = collinear(1e-5)
    with pytest.warns(IllConditionedWarning, match=r"condition number .* ridge=1e-6"):
        fit = fit_decomposition(y, h)
    assert fit.condition_number == pytest.approx(hand_condition(h), rel=1e-3)
    assert fit.ill_conditioned and "condition_number" in repr(fit)
    with pytest.warns(IllConditionedWarning):
        noise = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        fit2 = fit_decomposition(y + 1e-5 * noise, h)  # seeded: 38 of 40 seeds move the betas by > 1e-3
    assert (fit.beta[:2] - fit2.beta[:2]).abs().max() > 1e-3  # the instability the warning is about


def test_ridge_brings_the_condition_number_down_and_silences_the_warning():
    y, h = collinear(1e-5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", IllConditionedWarning)
        fit = fit_decomposition(y, h, ridge=1e-6)
    assert fit.condition_number < COND_WARN and not fit.ill_conditioned


def test_a_well_conditioned_regression_does_not_warn():
    y, h = collinear(1.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", IllConditionedWarning)
        fit = fit_decomposition(y, h)
    assert fit.condition_number == pytest.approx(hand_condition(h), rel=1e-6)


# ---------------------------------------------------------------------------------------- output folders
def test_models_with_the_same_folder_name_get_distinct_stable_folders():
    labels = output_folders(["runs/A/model", "runs/B/model", "gpt2", "tiny-opt"])
    assert labels == {"runs/A/model": "A-model", "runs/B/model": "B-model", "gpt2": "gpt2", "tiny-opt": "tiny-opt"}
    assert output_folders(["runs/A/model", "runs/B/model"]) == output_folders(["runs/A/model", "runs/B/model"])
    assert output_folders(["x/a/m", "y/a/m"]) == {"x/a/m": "x-a-m", "y/a/m": "y-a-m"}


def test_the_same_model_twice_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="same model"):
        output_folders(["gpt2", "gpt2"])
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(ConfigError, match="same model"):
        output_folders([str(d), str(d) + "/"])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["a", "b", "model", "m-1"]), min_size=1, max_size=3).map("/".join),
                min_size=1, max_size=5, unique=True))
def test_output_folders_never_collide(names):
    try:
        labels = output_folders(names)
    except ConfigError as err:
        assert "same output folder" in str(err) or "same model" in str(err)
        return
    assert len(set(labels.values())) == len(names)
    assert all(lab and "/" not in lab for lab in labels.values())


def test_capitals_mitigate_refuses_colliding_models_before_building_any(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["capitals", "mitigate", "--model", "tiny-gpt2", "tiny-gpt2", "--out", str(out)])
    assert code == 2 and "same model" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------ entry-point inputs
@pytest.mark.parametrize(("argv", "named"), [
    (["capitals", "analyze", "--model", "tiny-gpt2", "--device", "banana", "--out", "OUT"], "device='banana'"),
    (["bios", "mechanisms", "--run", str(RUN), "--threads", "-1", "--out", "OUT"], r"--threads -1.*>= 1"),
    (["bios", "mechanisms", "--run", str(RUN), "--device", "cuda:7", "--out", "OUT"], "cuda"),
])
def test_bad_common_options_are_refused_before_the_work(tmp_path, capsys, argv, named):
    import re

    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(named, err) and "factlens: error: ConfigError" in err
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "out"
    f.write_text("not a folder")
    assert main(["capitals", "mitigate", "--model", "tiny-gpt2", "--out", str(f)]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert main(["bios", "mechanisms", "--run", str(RUN), "--out", str(f)]) == 2
    assert "is an existing file" in capsys.readouterr().err


@pytest.fixture
def read_only_disk(monkeypatch):
    """Every new file fails as on a read-only file system (root writes through chmod, so it is simulated)."""
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)


def test_capitals_analyze_on_a_read_only_disk_is_refused_before_the_analysis(tmp_path, capsys, read_only_disk):
    assert main(["capitals", "analyze", "--model", "tiny-gpt2", "--out", str(tmp_path / "ro")]) == 2
    err = capsys.readouterr().err
    assert "StorageError: cannot write results to" in err and "Read-only file system" in err and "--out" in err


def test_result_writers_on_a_read_only_run_name_the_fix(tmp_path, capsys, read_only_disk):
    assert main(["bios", "attention", "--run", str(RUN), "--sequences", "4"]) == 2
    err = capsys.readouterr().err
    assert "StorageError" in err and "make it writable" in err
    assert "--out" not in err.split("Fix:")[1]  # the command has no --out: the fix is the run folder itself
    assert main(["bios", "mechanisms", "--run", str(RUN), "--out", str(tmp_path / "mech"), "--quiet"]) == 2
    assert "StorageError" in capsys.readouterr().err


def test_bios_metrics_under_a_float64_default_dtype():
    from factlens.bios import (
        BiosVocab,
        Pools,
        Population,
        attribute_metrics,
        hallucination_metrics,
        make_batch,
    )

    pools = Pools.sized(first_names=20, last_names=20, cities=30, universities=30, majors=20, companies=30, years=10)
    vocab = BiosVocab(pools)
    batch = make_batch(Population.generate(20, seed=0, pools=pools), vocab, np.arange(4),
                       rng=np.random.default_rng(0), seq_len=96)
    logits = torch.randn(4, 96, vocab.size, generator=torch.Generator().manual_seed(0))
    reference = hallucination_metrics(logits, batch)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert hallucination_metrics(logits, batch) == pytest.approx(reference, rel=1e-6)
        assert hallucination_metrics(logits.double(), batch) == pytest.approx(reference, rel=1e-5)
        metrics = attribute_metrics(logits, batch)
    finally:
        torch.set_default_dtype(previous)
    # hand computation: the loss is the mean over sequences and attributes of each value's summed -log p
    assert float(metrics.loss.mean()) == pytest.approx(reference["attr_loss"], rel=1e-5)


@pytest.mark.parametrize("seed", [-1, float("nan"), 1.5, "0", True])
def test_seeds_must_be_non_negative_integers(gpt2, seed, unchecked):
    with pytest.raises(ConfigError, match=r"seed=.*pass an integer >= 0"):
        recall.dataset_for(gpt2, seed=seed)
    with pytest.raises(ConfigError, match=r"seed=.*pass an integer >= 0"):
        recall.path_patch(gpt2, recall.dataset_for(gpt2, n=4), seed=seed, progress=False)


@pytest.mark.parametrize("budget", [-1, 0, float("nan"), float("inf"), True])
def test_a_memory_budget_must_be_a_positive_size(budget, unchecked):
    from factlens.resources import set_memory_budget

    with pytest.raises(ConfigError, match="memory size"):
        set_memory_budget(budget)
