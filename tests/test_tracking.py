"""Experiment tracking: TensorBoard event files and offline W&B runs hold the same scalars as metrics.jsonl,
the checkpoint steps and the config, read back with TensorBoard's own reader and from the W&B run file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from factlens.bios.metrics_log import read_jsonl
from factlens.bios.tracking import make_tracker
from factlens.bios.trainer import TrainConfig, train
from factlens.checkpoints import list_checkpoints
from factlens.cli import main
from factlens.errors import ConfigError


def _expected(run: Path) -> dict[str, dict[int, float]]:
    """``{"<kind>/<name>": {step: value}}`` from metrics.jsonl (the reference the trackers must match)."""
    out: dict[str, dict[int, float]] = {}
    for r in read_jsonl(run / "metrics.jsonl"):
        for k, v in r.items():
            if k not in ("kind", "step") and isinstance(v, int | float) and not isinstance(v, bool):
                out.setdefault(f"{r['kind']}/{k}", {})[r["step"]] = float(v)
    return out


def test_tensorboard_events_hold_metrics_checkpoints_and_config(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["bios", "train", "--preset", "tiny", "--out", str(run), "--log-to", "tensorboard", "--quiet"]) == 0
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    expected = _expected(run)
    assert set(acc.Tags()["scalars"]) == {*expected, "checkpoint/step"}
    for tag, values in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got.keys() == values.keys(), tag
        assert all(got[s] == pytest.approx(v, rel=1e-6) for s, v in values.items()), tag  # float32 events
    assert [e.step for e in acc.Scalars("checkpoint/step")] == list_checkpoints(run / "checkpoints")
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(config.strip("`\n")) == json.loads(json.dumps(TrainConfig.preset("tiny").to_dict()))


def _wandb_records(run_file: Path):
    """The protobuf records of a ``.wandb`` run file (a LevelDB-style log: 32 KiB blocks of chunks with a 7-byte
    header: checksum, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4; the file opens with a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = run_file.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def test_offline_wandb_run_holds_metrics_checkpoints_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    run = tmp_path / "run"
    train(TrainConfig.preset("tiny"), run, progress=False, log_to="wandb")
    (run_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    history: dict[str, dict[int, float]] = {}
    config: dict = {}
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            for key, value in items.items():
                if not key.startswith("_"):
                    history.setdefault(key, {})[int(items["_step"])] = float(value)
        elif kind == "run":
            config = {u.key: json.loads(u.value_json) for u in record.run.config.update if u.key != "_wandb"}
    expected = _expected(run)
    assert set(history) == {*expected, "checkpoint/step"}
    for tag, values in expected.items():
        assert history[tag] == pytest.approx(values, rel=1e-9), tag
    assert sorted(history["checkpoint/step"]) == list_checkpoints(run / "checkpoints")
    assert config == json.loads(json.dumps(TrainConfig.preset("tiny").to_dict()))


def test_unknown_tracker_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="tensorboard, wandb"):
        make_tracker("mlflow", tmp_path, TrainConfig.preset("tiny"))
    with pytest.raises(ConfigError):
        train(TrainConfig.preset("tiny"), tmp_path / "run", progress=False, log_to="tensorbord")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_grid_cells_log_to_tensorboard_through_the_executor(tmp_path, workers):
    """``bios grid --log-to tensorboard`` (and any cell list with ``ExecutorConfig(log_to=...)``): every cell,
    trained here or in a worker process, writes its own event file with its metrics.jsonl's scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "grid"
    assert main(["bios", "grid", "--preset", "tiny", "--steps", "4", "--reference-steps", "4", "--starts", "0",
                 "--out", str(out), "--log-to", "tensorboard", "--workers", str(workers), "--cpus-per-task", "1",
                 "--quiet"]) == 0
    runs = sorted(p.parent for p in out.rglob("metrics.jsonl"))
    assert len(runs) == 2  # the reference and the patched cell
    for run in runs:
        acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        expected = _expected(run)
        assert set(acc.Tags()["scalars"]) == {*expected, "checkpoint/step"}, run
        assert {e.step: e.value for e in acc.Scalars("eval/attr_loss")} == pytest.approx(expected["eval/attr_loss"])


def test_a_misspelt_tracker_in_the_executor_settings_is_refused():
    from factlens.bios.executor import ExecutorConfig

    with pytest.raises(ConfigError, match="tensorboard"):
        ExecutorConfig(log_to="tensorbord")
