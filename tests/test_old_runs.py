"""A run written before runs recorded their model (``model.json``) still resumes, exports and loads: its model config
comes from the recipe in its ``config.yaml``, and is the one training built. ``fixtures/old_runs/`` holds runs made by
that code (``fixtures/make_old_runs.py`` says how)."""

from __future__ import annotations

import json
import shutil
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
from uniperceiver_cli.train.recipe import validate

OLD_RUNS = Path(__file__).parent / "fixtures" / "old_runs"
MODELS = ("dense", "task-routed")  # task routing: training fills moe.tasks with the recipe's task names


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
def test_a_run_written_by_the_previous_version_resumes_exports_and_loads(data_root: Path, tmp_path: Path,
                                                                         model: str):
    run = tmp_path / "run"
    shutil.copytree(OLD_RUNS / model, run)
    assert not (run / MODEL_CONFIG_FILE).exists()
    data = {**yaml.safe_load((run / "config.yaml").read_text()), "data_root": str(data_root)}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    built = validate(data).model_config()
    old_weights = load_model(run, latest=True)  # the step-2 checkpoint the old code wrote
    assert old_weights.config == built

    _run("pretrain", "--recipe", recipe, "--run-dir", run, "--resume", "auto")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "lr" in json.loads(line)]
    assert steps == [1, 2, 3, 4] and (run / "final").is_dir()
    recorded = (run / MODEL_CONFIG_FILE).read_text()
    (run / MODEL_CONFIG_FILE).unlink()  # the resume recorded it; a finished old run has none

    _run("export", run, "--latest", "--out", tmp_path / "bundle")
    exported = load_model(tmp_path / "bundle")
    derived = load_model(run, latest=True)
    (run / MODEL_CONFIG_FILE).write_text(recorded)
    present = load_model(run, latest=True)
    assert exported.config == derived.config == present.config == built
    assert _same_weights(exported, present) and _same_weights(derived, present)
    assert _same_weights(load_model(run), present)  # the final bundle holds the last checkpoint's weights
    assert not _same_weights(old_weights, present)  # steps 3 and 4 trained


@pytest.mark.parametrize("planted", ['{"moe": 5}', '{"prompt": []}', '[1, 2]', '{"width": 1e400}', "[" * 100_000])
def test_a_planted_model_json_is_one_line(tmp_path: Path, planted: str):
    run = tmp_path / "run"
    shutil.copytree(OLD_RUNS / "dense", run)
    (run / MODEL_CONFIG_FILE).write_text(planted)
    with pytest.raises(CheckpointError, match=f"^{run / MODEL_CONFIG_FILE} is not a valid model config"):
        load_model(run, latest=True)
