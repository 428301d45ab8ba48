"""The routing levels from the command line: predict and evaluate a task-routed model as one of its tasks, caption
with a context-routed one, and the exports that a routing level cannot take are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import uniperceiver_cli as up
from tests.helpers import random_png
from uniperceiver_cli.cli.app import app
from uniperceiver_cli.data.shards import Manifest, Sample, write_shards

runner = CliRunner()
CLASSES = ["red", "green", "blue"]


def _bundle(path: Path, routing: str, **moe) -> Path:
    torch.manual_seed(0)
    model = up.create_model("tiny-moe", image_size=32, layer_scale_init=1.0,
                            moe={"routing": routing, **moe})
    return up.save_bundle(model, path)


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("routing-cli")
    manifest = Manifest(dataset="t", split="test", modality="image", tasks=["image_classification"], source="test",
                        classes=CLASSES)
    samples = [Sample(f"s{i}", image=random_png(i), image_ext="png", label=i % 3) for i in range(6)]
    write_shards(root / "split", samples, lambda s: s, manifest=manifest, min_shards=1, progress=False)
    (root / "img.png").write_bytes(random_png(7))
    return root


def test_a_task_routed_model_answers_as_one_of_its_tasks(split: Path, tmp_path: Path):
    bundle = _bundle(tmp_path / "task", "task", tasks=["shapes", "captions"])
    args = ["predict", str(split / "img.png"), "--model", str(bundle), "--label", "red", "--label", "blue", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "task routing needs the call's task" in result.stderr and "shapes, captions" in result.stderr
    result = runner.invoke(app, [*args, "--routing-task", "colours"])
    assert result.exit_code == 2 and "cannot serve task 'colours'" in result.stderr
    result = runner.invoke(app, [*args, "--routing-task", "shapes"])
    assert result.exit_code == 0, result.output
    assert {e["text"] for e in json.loads(result.stdout)[0]["top"]} == {"red", "blue"}

    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", "--model", str(bundle), "--data", str(split / "split"),
                                 "--task", "image_classification", "--out", str(out), "--routing-task", "shapes"])
    assert result.exit_code == 0, result.output
    assert 0 <= json.loads((out / "results.json").read_text())["metrics"]["acc@1"] <= 100
    result = runner.invoke(app, ["evaluate", "--model", str(bundle), "--data", str(split / "split"),
                                 "--task", "image_classification", "--out", str(tmp_path / "eval2")])
    assert result.exit_code == 2 and "cannot serve task 'image_classification'" in result.stderr


def test_a_context_routed_model_captions_without_the_cache(split: Path, tmp_path: Path):
    bundle = _bundle(tmp_path / "context", "context")
    result = runner.invoke(app, ["predict", str(split / "img.png"), "--model", str(bundle), "--caption",
                                 "--max-len", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.stdout)[0]["caption"], str)


@pytest.mark.parametrize("routing", ["token", "context", "task"])
def test_exports_a_routing_level_cannot_take_are_one_line(tmp_path: Path, routing: str):
    bundle = _bundle(tmp_path / "src", routing, **({"tasks": ["a"]} if routing == "task" else {}))
    result = runner.invoke(app, ["export", str(bundle), "--out", str(tmp_path / "onnx"), "--onnx"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert f"this one routes by {routing}" in result.stderr and not (tmp_path / "onnx").exists()
    if routing != "task":
        result = runner.invoke(app, ["export", str(bundle), "--out", str(tmp_path / "fold"), "--fold-experts"])
        assert result.exit_code == 2 and "its experts cannot be folded" in result.stderr
        assert result.stderr.count("\n") == 1 and not (tmp_path / "fold").exists()
