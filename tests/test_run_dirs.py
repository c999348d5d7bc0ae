"""A run directory is owned by its run: checked before any write, locked, never mixed, resumed without duplicates.

The property test drives random sequences of run-directory operations (train, a kill at a random step, resume,
re-runs with the same or another config, a second trainer while the lock is held) and checks the invariants
after every operation. The other tests pin each case of issue 14's root causes 1 and 2.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import factlens
from factlens.bios.data.population import Population
from factlens.bios.run import LOCK, Run
from factlens.bios.trainer import TrainConfig, Trainer, train
from factlens.checkpoints import list_checkpoints, load_checkpoint
from factlens.errors import CheckpointError, ConfigError, DivergenceError, StorageError
from factlens.storage import FolderLock as RunLock

POOLS = dict(first_names=20, last_names=20, cities=10, universities=6, majors=5, companies=6, years=10)
POPULATION = Population.generate(16, seed=0, pools=TrainConfig.preset("tiny", pools=POOLS).make_pools())


def cfg(**overrides) -> TrainConfig:
    base = dict(steps=6, n_people=16, batch_size=4, n_eval_sequences=8, n_unseen=0, checkpoint_every=3,
                log_every=2, resume_every=2, keep_resume=2, pools=POOLS, eval_batch_size=8)
    return TrainConfig.preset("tiny", **{**base, **overrides})


def run(config: TrainConfig, out: Path, **kw):
    return train(config, out, progress=False, population=POPULATION, **kw)


class Killed(Exception):
    """Stands in for SIGKILL at a step (the subprocess SIGKILL case is in test_bios_train.py)."""


def kill_at(monkeypatch, k: int) -> None:
    original = Trainer.train_step

    def step(self, s):
        if s == k:
            raise Killed(s)
        return original(self, s)

    monkeypatch.setattr(Trainer, "train_step", step)


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_invariants(out: Path) -> None:
    records = rows(out)
    keys = [(r["kind"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)), f"duplicate metrics rows: {keys}"
    for kind in ("train", "eval"):
        steps = [s for k, s in keys if k == kind]
        assert steps == sorted(steps), f"{kind} rows out of order: {steps}"
    manifests = Run(out).manifests.values() if out.exists() else []
    configs = {json.dumps(TrainConfig.from_dict(c.config).to_dict(), sort_keys=True) for c in manifests}
    assert len(configs) <= 1, "checkpoints of two configs in one run directory"
    if configs and (out / "config.json").exists():
        assert json.dumps(Run(out).config.to_dict(), sort_keys=True) == configs.pop()
    assert len(list_checkpoints(out / "resume")) <= 2


CONFIGS = {"a": cfg(), "b": cfg(lr=2e-3), "short": cfg(steps=3)}
OPS = st.one_of(
    st.tuples(st.just("train"), st.sampled_from(sorted(CONFIGS)), st.none() | st.integers(0, 5)),
    st.tuples(st.just("concurrent"), st.sampled_from(sorted(CONFIGS)), st.none()),
)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(OPS, min_size=1, max_size=3))
def test_run_directory_operations_keep_invariants(tmp_path_factory, ops):
    root = tmp_path_factory.mktemp("ops")
    out, neighbour = root / "run", root / "neighbour"
    neighbour.mkdir()
    (neighbour / "metrics.jsonl").write_text('{"other tool": 1}\n')
    owner = None  # the config that owns the directory once a trainer has started in it
    for op, name, k in ops:
        config = owner if op == "concurrent" and owner is not None else CONFIGS[name]
        before, outside = snapshot(out) if out.exists() else {}, snapshot(neighbour)
        with pytest.MonkeyPatch.context() as mp:
            if op == "concurrent":  # a second trainer while one holds the lock
                out.mkdir(exist_ok=True)
                with RunLock(out / LOCK), pytest.raises(CheckpointError, match="in use by another trainer"):
                    run(config, out)
                assert snapshot(out) == before or owner is None
            elif owner is not None and config != owner:
                with pytest.raises(CheckpointError, match="new output directory"):
                    run(config, out)
                assert snapshot(out) == before, "a refused run wrote into the directory"
            else:
                if k is not None:
                    kill_at(mp, k)
                try:
                    history = run(config, out)
                except Killed:
                    pass
                else:
                    assert history.final["step"] == config.steps
                owner = config
        assert snapshot(neighbour) == outside, "a file outside the run directory was touched"
        assert sorted(p.name for p in root.iterdir()) == sorted({"neighbour", *(["run"] if out.exists() else [])})
        assert_invariants(out)


def test_resume_truncates_metrics_and_a_finished_rerun_writes_nothing(tmp_path, monkeypatch):
    config = cfg(checkpoint_every=2)
    reference = tmp_path / "reference"
    run(config, reference)
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        kill_at(mp, 5)  # after the resume checkpoint at step 4 and the evaluation at step 4
        with pytest.raises(Killed):
            run(config, out)
    run(config, out)
    strip = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "rss_gib", "peak_rss_gib")} for r in rows(out)]
    assert strip == [{k: v for k, v in r.items() if k not in ("tokens_per_s", "rss_gib", "peak_rss_gib")}
                     for r in rows(reference)]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != LOCK}
    run(config, out)  # finished: nothing is rewritten
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != LOCK} == before


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        kill_at(mp, 5)
        with pytest.raises(Killed):
            run(cfg(), out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 6, "lo')  # a crash mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        _ = Run(out).history
    history = run(cfg(), out)
    assert_invariants(out)
    assert history.train["step"].tolist() == [2, 4, 6]


def test_refused_rerun_changes_nothing(tmp_path):
    """The issue's case: a re-run with --people 32 into a finished run used to overwrite config.json."""
    out = tmp_path / "run"
    run(cfg(), out)
    before = snapshot(out)
    with pytest.raises(CheckpointError, match=r"differs in \['n_people'\].*new output directory"):
        train(cfg(n_people=32), out, progress=False)
    assert snapshot(out) == before
    assert Run(out).config == cfg()


def test_shorter_run_into_an_older_run_is_refused(tmp_path):
    out = tmp_path / "run"
    run(cfg(), out)
    with pytest.raises(CheckpointError, match="steps"):
        run(cfg(steps=3), out)
    assert list_checkpoints(out / "checkpoints") == [0, 3, 6]


@pytest.mark.parametrize("content", ["hf", "metrics"])
def test_other_tools_files_are_never_wiped(tmp_path, content):
    out = tmp_path / "foreign"
    if content == "hf":
        factlens.build_hf("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=50).save_pretrained(out)
    else:
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"epoch": 1, "val_loss": 0.3}\n')
    before = snapshot(out)
    with pytest.raises(CheckpointError, match=r"not a factlens training run.*new or empty directory"):
        run(cfg(), out)
    assert snapshot(out) == before


def test_lock_refuses_a_second_trainer_and_a_dead_owner_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out / LOCK), pytest.raises(CheckpointError, match=f"pid {os.getpid()}.*Wait for it to finish"):
        run(cfg(), out)
    # what a SIGKILLed trainer leaves: a lock file naming a dead owner, but no kernel lock held
    (out / LOCK).write_text(json.dumps({"pid": 2**22 + 7, "host": "gone", "since": "2026-01-01T00:00:00+00:00"}))
    run(cfg(), out)
    assert (out / LOCK).read_text() == ""  # released cleanly


def test_only_the_last_resume_checkpoints_are_kept(tmp_path):
    run(cfg(steps=12, keep_resume=2), tmp_path / "run")
    assert list_checkpoints(tmp_path / "run" / "resume") == [10, 12]


def test_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        run(cfg(), tmp_path / "run")
    finally:
        os.umask(old)
    out = tmp_path / "run"
    for path in [out, out / "checkpoints" / "step_0000003", out / "resume" / "step_0000006"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path
    for path in [out / "config.json", out / "metrics.jsonl", out / "checkpoints" / "step_0000003" / "manifest.json",
                 out / "resume" / "step_0000006" / "optimizer.pt", out / "checkpoints" / "step_0000003" / "model.safetensors"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_readers_refuse_a_config_json_that_disagrees_with_the_manifest(tmp_path, capsys):
    from factlens.cli import main

    out = tmp_path / "run"
    history = run(cfg(), out)
    assert main(["bios", "eval", "--run", str(out), "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["step"] == 6
    assert evaluated["attr_loss"] == pytest.approx(history.final["attr_loss"], rel=1e-6)  # what the run logged
    edited = {**json.loads((out / "config.json").read_text()), "n_people": 8}
    (out / "config.json").write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match=r"disagrees.*\['n_people'\].*Restore it or delete it"):
        _ = Run(out).config
    with pytest.raises(CheckpointError, match="disagrees"):
        _ = Run(out).history
    assert main(["bios", "eval", "--run", str(out), "--device", "cpu"]) == 2
    assert main(["bios", "plot", "--run", str(out)]) == 2
    (out / "config.json").unlink()  # the manifest alone is enough
    assert Run(out).config == cfg()


def test_divergence_stops_within_one_logging_interval_and_saves_nothing_non_finite(tmp_path, monkeypatch):
    original = Trainer.train_step
    seen = []

    def poisoned(self, s):  # a step whose update makes every weight NaN (as a huge LR or negative decay does)
        loss = original(self, s)
        seen.append(s)
        if s == 2:
            with torch.no_grad():
                for p in self.raw_model.parameters():
                    p.fill_(float("nan"))
        return loss

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(DivergenceError, match=r"by step 3.*lower lr.*min_lr <= lr.*weight_decay >= 0.*grad_clip"):
        run(cfg(log_every=2, resume_every=4, checkpoint_every=3), out)
    assert seen == [0, 1, 2], "the run went on past the first check after the divergence"
    for sub in ("checkpoints", "resume"):
        for step in list_checkpoints(out / sub):
            state = load_checkpoint(out / sub / f"step_{step:07d}").state
            assert all(torch.isfinite(v).all() for v in state.values())
    assert all(r["step"] <= 2 for r in rows(out))


@pytest.mark.parametrize(("overrides", "fix"), [
    (dict(min_lr=1e4), "min_lr <= lr"), (dict(weight_decay=-0.1), "weight_decay >= 0"),
    (dict(betas=(0.9, 1.0)), r"\[0, 1\)"), (dict(lr=0.0), "e.g. 4e-4"), (dict(grad_clip=0.0), "or None"),
])
def test_optimiser_settings_are_validated_up_front(overrides, fix):
    with pytest.raises(ConfigError, match=fix):
        cfg(**overrides)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_names_the_path_and_the_fix(tmp_path, monkeypatch, code):
    import factlens.checkpoints as checkpoints

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoints, "save_file", fail)
    out = tmp_path / "run"
    fix = "Free some space" if code == errno.ENOSPC else "writable directory"
    with pytest.raises(StorageError, match=f"cannot write {out}/checkpoints/step_0000000.*{fix}"):
        run(cfg(), out)
    assert not [p for p in (out / "checkpoints").iterdir()], "a partial checkpoint was left behind"


def test_too_little_disk_is_refused_before_any_write(tmp_path, monkeypatch):
    import factlens.bios.run as rundir

    monkeypatch.setattr(rundir, "free_bytes", lambda path: 1000)
    out = tmp_path / "run"
    with pytest.raises(StorageError, match=r"1000 B free.*checkpoints of .*fewer checkpoints"):
        run(cfg(), out)
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod; the ENOSPC/EROFS test covers root")
def test_read_only_directory_with_chmod(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(StorageError, match="writable directory"):
            run(cfg(), ro / "run")
    finally:
        ro.chmod(0o755)


def test_out_that_is_a_file_and_run_that_does_not_exist(tmp_path):
    from factlens.cli import main

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"is a file\. Pass a directory path"):
        Run(tmp_path / "file").check(cfg())
    assert main(["bios", "train", "--preset", "tiny", "--out", str(tmp_path / "file")]) == 2
    assert main(["bios", "plot", "--run", str(tmp_path / "missing")]) == 2
