"""A run written before runs recorded their model (``model.json``) still resumes, exports and loads: its model config
comes from the recipe in its ``config.yaml``, and is the one training built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tests.helpers import image_split
from uniperceiver_cli.checkpoints.errors import CheckpointError
from uniperceiver_cli.checkpoints.loading import load_model
from uniperceiver_cli.checkpoints.runs import MODEL_CONFIG_FILE
from uniperceiver_cli.cli.app import app
from uniperceiver_cli.model.config import ModelConfig
from uniperceiver_cli.train import loop
from uniperceiver_cli.train.recipe import validate

MODELS = {
    "dense": {"preset": "tiny", "overrides": {"image_size": 32, "layers": 1}},
    # task routing: training fills moe.tasks with the recipe's task names, so the config.yaml alone lacks them
    "task-routed": {"preset": "tiny-moe", "overrides": {"image_size": 32, "layers": 1, "moe": {"routing": "task"}}},
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("old-runs")
    image_split(root / "split", 8)
    return root


def _run(*args: str | Path) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    one, other = a.state_dict(), b.state_dict()
    return one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)


@pytest.mark.parametrize("model", MODELS)
def test_a_run_without_model_json_resumes_exports_and_loads(data_root: Path, tmp_path: Path, model: str):
    data = {"name": "old", "stage": "pretrain", "data_root": str(data_root),
            "tasks": [{"name": "cls", "type": "image_classification", "data": "split", "batch_size": 4,
                       "augment": False}],
            "model": MODELS[model], "train": {"steps": 4, "log_every": 1, "checkpoint_every": 2}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    loop.train(validate(data), run, stop_after=2)
    recorded = (run / MODEL_CONFIG_FILE).read_text()
    built = ModelConfig.from_dict(json.loads(recorded))
    (run / MODEL_CONFIG_FILE).unlink()  # as a run of the previous version was left

    _run("pretrain", "--recipe", recipe, "--run-dir", run, "--resume", "auto")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "lr" in json.loads(line)]
    assert steps == [1, 2, 3, 4] and (run / "final").is_dir()
    (run / MODEL_CONFIG_FILE).unlink()  # the resume recorded it; a finished old run has none

    _run("export", run, "--latest", "--out", tmp_path / "bundle")
    exported = load_model(tmp_path / "bundle")
    derived = load_model(run, latest=True)
    (run / MODEL_CONFIG_FILE).write_text(recorded)
    present = load_model(run, latest=True)
    assert exported.config == derived.config == present.config == built
    assert _same_weights(exported, present) and _same_weights(derived, present)
    assert _same_weights(load_model(run), present)  # the final bundle holds the last checkpoint's weights


@pytest.mark.parametrize("planted", ['{"moe": 5}', '{"prompt": []}', '[1, 2]', '{"width": 1e400}', "[" * 100_000])
def test_a_planted_model_json_is_one_line(data_root: Path, tmp_path: Path, planted: str):
    data = {"name": "old", "stage": "pretrain", "data_root": str(data_root),
            "tasks": [{"name": "cls", "type": "image_classification", "data": "split", "batch_size": 4,
                       "augment": False}],
            "model": MODELS["dense"], "train": {"steps": 2, "log_every": 1, "checkpoint_every": 2}}
    run = tmp_path / "run"
    loop.train(validate(data), run)
    (run / MODEL_CONFIG_FILE).write_text(planted)
    with pytest.raises(CheckpointError, match=f"^{run / MODEL_CONFIG_FILE} is not a valid model config"):
        load_model(run, latest=True)
