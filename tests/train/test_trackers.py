"""train.report_to: a 20-step ToyWorld run logs to TensorBoard, Weights & Biases (offline) and MLflow (a file store
in the run) the values of metrics.jsonl, read back from each tracker's own files; a missing package is one line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from uniperceiver_cli.train import trackers
from uniperceiver_cli.train.loop import train
from uniperceiver_cli.train.recipe import validate
from uniperceiver_cli.train.trackers import IDS_FILE, metric_name

TASKS = [
    {"name": "shape", "type": "image_classification", "data": "images/train", "label_set": "shape", "batch_size": 8,
     "augment": False},
    {"name": "mlm", "type": "text_mlm", "data": "text/train", "batch_size": 4, "max_text_len": 32,
     "vocabulary": "sampled", "negatives": 64},
]


def _recipe(root: Path, report_to: list[str]):  # noqa: ANN202
    return validate({"name": "tracked", "stage": "pretrain", "data_root": str(root), "tasks": TASKS,
                     "model": {"preset": "tiny", "overrides": {"image_size": 32, "max_frames": 2}},
                     "train": {"steps": 20, "log_every": 5, "report_to": report_to},
                     "evaluation": {"every": 10, "tasks": [{"name": "shape", "type": "image_classification",
                                                            "data": "images/val", "label_set": "shape"}]}})


def _wandb_history(run_dir: Path) -> list[dict]:
    """The history records of the offline W&B run: its .wandb file is a LevelDB-style log (a 7-byte header, then in
    32 KiB blocks records of a 4-byte checksum, a 2-byte length and a 1-byte type: full 1, first 2, middle 3,
    last 4) of the wandb protocol's Record messages."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, pending, history = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
    return history


def test_trackers_log_the_values_of_metrics_jsonl(toyworld_32: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = tmp_path / "run"
    train(_recipe(toyworld_32, ["tensorboard", "wandb", "mlflow"]), run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = {(r["step"], k): v for r in records for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    assert {k for _, k in expected} >= {"shape/loss", "mlm/loss", "eval/shape/acc@1", "samples_per_s"}
    assert {s for s, _ in expected} == {5, 10, 15, 20}

    logged = {(row["_step"], k): v for row in _wandb_history(run) for k, v in row.items() if not k.startswith("_")}
    assert logged == expected

    from mlflow.tracking import MlflowClient

    client = MlflowClient((run / "mlruns").resolve().as_uri())
    run_id = json.loads((run / IDS_FILE).read_text())["mlflow"]
    names = {metric_name(k) for _, k in expected}
    assert "eval/shape/acc_1" in names
    from_mlflow = {(m.step, m.key): m.value for name in names for m in client.get_metric_history(run_id, name)}
    assert from_mlflow == {(s, metric_name(k)): v for (s, k), v in expected.items()}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    from_tensorboard = {(e.step, tag): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert from_tensorboard.keys() == expected.keys()
    assert all(from_tensorboard[k] == pytest.approx(v, rel=1e-6) for k, v in expected.items())  # float32 events


def test_a_missing_tracker_package_is_refused_before_training(toyworld_32: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ValueError, match=r"train.report_to: wandb needs the wandb package: pip install "
                                         r"'uniperceiver\[wandb\]'"):
        train(_recipe(toyworld_32, ["wandb"]), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="names a tracker twice"):
        _recipe(toyworld_32, ["mlflow", "mlflow"])
