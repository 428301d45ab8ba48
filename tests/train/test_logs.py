"""Training's console output and compute threads: plain lines a cluster job's log file can read, and
``train.threads: auto``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import random_png
from uniperceiver_cli.data.shards import Manifest, Sample, write_shards
from uniperceiver_cli.train.loop import compute_threads, share_workers
from uniperceiver_cli.train.recipe import validate

REPO = Path(__file__).resolve().parents[2]


def _recipe(root: Path, **train) -> dict:
    return {"name": "logs", "stage": "pretrain", "data_root": str(root),
            "tasks": [{"name": "cls", "type": "image_classification", "data": "split", "batch_size": 2,
                       "augment": False},
                      {"name": "cls2", "type": "image_classification", "data": "split", "batch_size": 2,
                       "augment": False}],
            "model": {"preset": "tiny", "overrides": {"image_size": 32}},
            "train": {"steps": 3, "log_every": 1, "warmup_steps": 0, **train}}


def test_threads_auto_is_the_cores_left_after_the_loader_workers(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    spec = validate(_recipe(Path("."), num_workers=2)).train
    assert spec.threads == "auto"  # the default
    assert compute_threads(spec, environ={}) == 6  # 8 cores, 2 loader workers
    assert compute_threads(spec, environ={"LOCAL_WORLD_SIZE": "2"}) == 2  # 4 cores each, 2 workers
    assert compute_threads(validate(_recipe(Path("."), num_workers=5)).train, environ={"LOCAL_WORLD_SIZE": "2"}) == 1
    assert compute_threads(spec, environ={"LOCAL_WORLD_SIZE": "8"}) == 1  # at least one
    assert compute_threads(spec, environ={"LOCAL_WORLD_SIZE": "2(x3)"}) == 6  # unreadable: not shared
    assert compute_threads(validate(_recipe(Path("."), num_workers=0)).train, environ={}) == 8
    assert compute_threads(validate(_recipe(Path("."), threads=3)).train, environ={}) == 3
    assert compute_threads(validate(_recipe(Path("."), threads=None)).train, environ={}) is None


@pytest.mark.parametrize(("budget", "weights", "expected"), [
    (5, {"a": 3.5, "b": 0.75, "c": 1.5, "d": 0.25, "e": 1.75}, {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}),
    (8, {"a": 1.0, "b": 3.0, "c": 2.0}, {"a": 2, "b": 3, "c": 3}),  # 2 each, the rest to b then c
    (2, {"a": 1.0, "b": 3.0, "c": 2.0}, {"a": 0, "b": 1, "c": 1}),  # fewer than tasks: a decodes in the process
    (4, {"a": 1.0, "never": 0.0}, {"a": 4, "never": 0}),
    (0, {"a": 1.0}, {"a": 0}),
])
def test_the_worker_budget_is_shared_by_the_tasks(budget: int, weights: dict, expected: dict):
    assert share_workers(budget, weights) == expected


def test_a_log_file_gets_one_plain_line_per_logged_step(tmp_path: Path):
    manifest = Manifest(dataset="t", split="train", modality="image", tasks=["image_classification"],
                        source="test", classes=["red", "green", "blue"])
    samples = [Sample(f"s{i}", image=random_png(i), image_ext="png", label=i % 3) for i in range(4)]
    write_shards(tmp_path / "split", samples, lambda s: s, manifest=manifest, min_shards=1, progress=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tmp_path)))
    log = tmp_path / "job.err"  # what SLURM's --output or `2> file` leaves: stderr is not a terminal
    with log.open("w") as err:
        done = subprocess.run([sys.executable, "-m", "uniperceiver_cli", "pretrain", "--recipe", str(recipe),
                               "--run-dir", str(tmp_path / "run"), "--device", "cpu"], cwd=REPO, stderr=err,
                              stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    text = log.read_text()
    assert done.returncode == 0, text[-2000:]
    lines = [line for line in text.splitlines() if line.startswith("step ")]
    pattern = (r"^step (\d)/3  loss( cls2? \d+\.\d{4})+  \d+ samples/s  elapsed \d+:\d\d:\d\d  "
               r"eta \d+:\d\d:\d\d$")
    assert [int(re.match(pattern, line).group(1)) for line in lines] == [1, 2, 3], text[-2000:]
    assert "━" not in text  # no progress bar in a file
    assert lines[-1].endswith("eta 0:00:00")
