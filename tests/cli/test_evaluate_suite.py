"""``uniperceiver evaluate --suite``: a list of tasks into one folder each and summary.csv, --skip-existing, a task
that fails among others, and the same suite on 2 processes under torchrun giving one process's metrics."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import uniperceiver_cli as up
from tests.helpers import image_split
from uniperceiver_cli.cli.app import app
from uniperceiver_cli.evaluate.suite import existing_result
from uniperceiver_cli.train.recipe import load_suite

# Tests that start several processes run one after another on one xdist worker (Makefile: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("processes")

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()

# batch size 1: every sample goes through the same shapes on one process or two, so the outputs are bitwise alike
SUITE = """\
data_root: {root}
tasks:
  - {{name: shape, type: image_classification, data: images/test, label_set: shape, batch_size: 1}}
  - {{name: captions, type: image_caption, data: images/test, max_len: 4, batch_size: 1}}
  - {{name: retrieval, type: image_retrieval, data: images/test, captions_per_item: 1, batch_size: 1}}
  - {{name: mlm, type: text_mlm, data: text/val, batch_size: 1}}
  - {{name: follows, type: text_classification, data: sentences/val, batch_size: 1}}
  - {{name: vqa, type: vqa, data: questions/val, batch_size: 1}}
"""


@pytest.fixture(scope="module")
def suite(toyworld_32, tmp_path_factory):
    """The suite, with a split of one sample (which leaves a second process's share empty), its model, and its
    results on one process in ``one/``."""
    folder = tmp_path_factory.mktemp("suite")
    torch.manual_seed(0)
    up.save_bundle(up.create_model("tiny", image_size=32, layer_scale_init=1.0), folder / "bundle")
    image_split(folder / "single", 1, min_shards=1)
    (folder / "suite.yaml").write_text(SUITE.format(root=toyworld_32) + f"  - {{name: single, type: "
                                       f"image_classification, data: {folder / 'single'}}}\n")
    result = _run("--suite", folder / "suite.yaml", "--model", folder / "bundle", "--out", folder / "one")
    assert result.exit_code == 0, result.output
    return folder


def _summary(out: Path) -> list[dict]:
    with (out / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def _run(*args) -> object:
    return runner.invoke(app, ["evaluate", *map(str, args)])


def test_a_suite_writes_every_task_and_a_summary_then_skips_what_exists(suite, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(suite / "one", out)
    rows = _summary(out)
    assert [r["task"] for r in rows][:2] == ["shape", "shape"]  # acc@1, acc@5
    assert {r["task"] for r in rows} == {"shape", "captions", "retrieval", "mlm", "single", "follows", "vqa"}
    assert {r["status"] for r in rows} == {"evaluated"}
    for row in rows:
        results = json.loads((out / row["task"] / "results.json").read_text())
        assert float(row["value"]) == pytest.approx(results["metrics"][row["metric"]])
        assert row["model_sha256"] == results["model"]["sha256"] and len(row["model_sha256"]) == 64
    assert {r["samples"] for r in rows if r["task"] not in ("mlm", "single")} == {"32"}
    written = {task: (out / task / "results.json").stat().st_mtime_ns for task in ("shape", "mlm")}

    (suite / "changed.yaml").write_text((suite / "suite.yaml").read_text().replace(
        "data: text/val, batch_size: 1", "data: text/val, batch_size: 2"))
    result = _run("--suite", suite / "changed.yaml", "--model", suite / "bundle", "--out", out, "--skip-existing")
    assert result.exit_code == 0, result.output
    status = {r["task"]: r["status"] for r in _summary(out)}
    assert status == {"shape": "kept", "captions": "kept", "retrieval": "kept", "mlm": "evaluated", "single": "kept",
                      "follows": "kept", "vqa": "kept"}
    assert (out / "shape" / "results.json").stat().st_mtime_ns == written["shape"]
    assert (out / "mlm" / "results.json").stat().st_mtime_ns != written["mlm"]
    assert [r["value"] for r in _summary(out) if r["task"] == "shape"] == [r["value"] for r in rows
                                                                           if r["task"] == "shape"]
    settings = json.loads((out / "shape" / "results.json").read_text())["settings"]
    assert settings["precision"] == "auto" and settings["data_root"] == str(Path(load_suite(
        suite / "suite.yaml").data_root).resolve())
    sha = rows[0]["model_sha256"]
    assert existing_result(out / "shape", {"sha256": sha}, settings)["status"] == "kept"
    assert existing_result(out / "shape", {"sha256": sha}, {**settings, "precision": "bf16"}) is None
    assert existing_result(out / "shape", {"sha256": "0" * 64}, settings) is None  # another model's weights
    assert existing_result(out / "shape", {"sha256": None}, settings) is None  # a fresh model is always evaluated


def test_a_failing_task_is_one_line_and_the_others_are_kept(suite, tmp_path):
    lines = (suite / "suite.yaml").read_text().splitlines()
    text = "\n".join(lines[:3]) + "\n  - {name: gone, type: image_classification, data: nowhere}\n"  # shape, gone
    (tmp_path / "suite.yaml").write_text(text)
    result = _run("--suite", tmp_path / "suite.yaml", "--model", suite / "bundle", "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "error: gone:" in result.stderr and "nowhere" in result.stderr
    rows = _summary(tmp_path / "out")
    assert rows[-1]["task"] == "gone" and rows[-1]["status"].startswith("failed: ")
    assert {r["status"] for r in rows[:-1]} == {"evaluated"}


def test_suite_options_are_checked(suite, tmp_path, monkeypatch):
    result = _run("--suite", suite / "suite.yaml", "--preset", "tiny", "--data", tmp_path, "--beam-size", "3")
    assert result.exit_code == 2 and "drop --data, --beam-size" in result.stderr
    result = _run("--data", tmp_path, "--preset", "tiny", "--skip-existing")
    assert result.exit_code == 2 and "--skip-existing goes with --suite" in result.stderr
    (tmp_path / "bad.yaml").write_text("tasks:\n  - {name: a, type: image_classification, data: x, beams: 2}\n")
    result = _run("--suite", tmp_path / "bad.yaml", "--preset", "tiny")
    assert result.exit_code == 2 and "tasks.0.beams" in result.stderr
    monkeypatch.chdir(tmp_path)  # a shipped recipe's tasks, whose data folders are not here
    result = _run("--suite", "toyworld-tiny", "--preset", "tiny", "--out", tmp_path / "o")
    assert result.exit_code == 1 and result.stderr.count("\n") == 9  # one line per evaluation task
    assert "error: shape_classification: no manifest.json at data/toyworld/images/test" in result.stderr


def test_two_processes_under_torchrun_give_one_process_metrics(suite, tmp_path):
    one = suite / "one"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "uniperceiver_cli", "evaluate", "--suite", str(suite / "suite.yaml"), "--model",
                          str(suite / "bundle"), "--out", str(tmp_path / "two"), "--device", "cpu"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("wrote ") == 1  # the main process writes and prints
    ones, twos = _summary(one), _summary(tmp_path / "two")
    assert [(r["task"], r["metric"], r["samples"]) for r in ones] == [(r["task"], r["metric"], r["samples"])
                                                                       for r in twos]
    for a, b in zip(ones, twos, strict=True):
        assert float(a["value"]) == pytest.approx(float(b["value"]), abs=1e-9), (a, b)
    assert [r["samples"] for r in twos if r["task"] == "single"] == ["1", "1"]
    for task in ("shape", "captions", "retrieval", "single", "follows", "vqa"):
        keys = [json.loads(line)["key"] for line in (tmp_path / "two" / task / "predictions.jsonl").open()]
        assert sorted(keys) == sorted(json.loads(line)["key"] for line in (one / task / "predictions.jsonl").open())
        assert json.loads((tmp_path / "two" / task / "results.json").read_text())["data"]["processes"] == 2
