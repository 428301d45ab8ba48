"""Where a run's logged values go besides ``metrics.jsonl`` (``train.report_to``): TensorBoard events (the
default), Weights & Biases and MLflow (optional extras: ``pip install 'uniperceiver[wandb]'`` / ``[mlflow]``).

Each tracker gets every numeric value of every ``metrics.jsonl`` record at its step, from the main process. Its
files stay in the run directory unless the tracker's own settings point elsewhere: W&B writes under ``RUN/wandb``
(online, or offline with ``WANDB_MODE=offline``; project ``WANDB_PROJECT``, default "uniperceiver"); MLflow logs to
``MLFLOW_TRACKING_URI``, default a file store ``RUN/mlruns`` (experiment ``MLFLOW_EXPERIMENT_NAME``, default
"uniperceiver"). A resumed run continues the same W&B and MLflow runs (their ids are kept in ``RUN/trackers.json``).
Where the values go is the environment's (and the user's login), never the recipe's: a recipe only picks trackers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Protocol

from uniperceiver_cli.checkpoints.runs import TENSORBOARD_DIR
from uniperceiver_cli.text_files import read_json

TRACKERS = ("tensorboard", "wandb", "mlflow")
IDS_FILE = "trackers.json"
PROJECT = "uniperceiver"
_ID = re.compile(r"[A-Za-z0-9]{1,64}")
_MLFLOW_NAME = re.compile(r"[^\w./\- :]")  # the characters MLflow refuses in a metric name


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def check_available(report_to: list[str]) -> None:
    """Refuse, before training starts, a tracker whose package is not installed (one line)."""
    for name in report_to:
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"train.report_to: {name} needs the {name} package: pip install "
                             f"'uniperceiver[{name}]'")


def open_trackers(report_to: list[str], run_dir: Path, config: dict[str, Any]) -> list[Tracker]:
    """The trackers of ``report_to``, started for the run in ``run_dir`` (``config``: the resolved recipe)."""
    check_available(report_to)
    ids = _read_ids(run_dir)
    opened: dict[str, Tracker] = {}
    for name in report_to:
        try:
            if name == "tensorboard":
                opened[name] = TensorBoard(run_dir)
            elif name == "wandb":
                opened[name] = WandB(run_dir, config, ids.get("wandb"))
            else:
                opened[name] = MLflow(run_dir, config, ids.get("mlflow"))
        except Exception as e:  # noqa: BLE001 - not logged in, a tracking server not reached, ...: one line
            for tracker in opened.values():
                tracker.close()
            raise ValueError(f"train.report_to: {name} could not start: {' '.join(str(e).split())[:300]}") from None
    new = {name: tracker.run_id for name, tracker in opened.items() if getattr(tracker, "run_id", None)}
    if new != {k: v for k, v in ids.items() if k in new}:
        tmp = run_dir / (IDS_FILE + ".tmp")
        tmp.write_text(json.dumps({**ids, **new}) + "\n")
        os.replace(tmp, run_dir / IDS_FILE)
    return list(opened.values())


def _read_ids(run_dir: Path) -> dict[str, str]:
    """The W&B and MLflow run ids of a resumed run; an id that is not plain letters and digits is ignored."""
    path = run_dir / IDS_FILE
    if not path.is_file():
        return {}
    data = read_json(path, "tracker ids", limit=4096)
    return {k: v for k, v in data.items() if k in TRACKERS and isinstance(v, str) and _ID.fullmatch(v)} \
        if isinstance(data, dict) else {}


class TensorBoard:
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None) -> None:
        import wandb

        self.run_id = run_id or secrets.token_hex(8)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_dir.name, dir=str(run_dir),
                              config=config, id=self.run_id, resume="allow")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:  # a file store in the run directory, which MLflow 3 keeps behind this switch
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found is not None else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
            self.client.log_dict(run_id, config, "recipe.json")
        self.run_id = run_id

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(metric_name(k), float(v), now, step)
                                                    for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def metric_name(key: str) -> str:
    """A metric's key as MLflow takes it: "acc@1" -> "acc_1" (MLflow refuses characters other than letters,
    digits, ``_ . / - :`` and spaces)."""
    return _MLFLOW_NAME.sub("_", key)
