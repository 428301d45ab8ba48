"""The shipped recipes and ``uniperceiver recipes``: every file validates, the CLI lists, shows, copies and
reports malformed recipes and missing data in one line each."""

import importlib
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from uniperceiver_cli.cli import recipes
from uniperceiver_cli.cli.recipes import RECIPES_DIR, app, load_checked, resolve_recipe, shipped_names

runner = CliRunner()
FILES = sorted(RECIPES_DIR.glob("*.yaml"))


def test_the_papers_recipes_are_shipped():
    names = set(shipped_names())
    assert {"toyworld-tiny", "toyworld-tiny-moe"} <= names
    for size in ("base", "large", "base-moe", "large-moe"):
        assert {f"{size}-pretrain-stage1", f"{size}-pretrain-stage2"} <= names
    for bench in ("imagenet", "kinetics400", "coco-caption", "coco-retrieval", "flickr30k-caption",
                  "flickr30k-retrieval", "msvd-caption", "msvd-retrieval"):
        assert {f"base-finetune-{bench}", f"base-prompt-tune-{bench}"} <= names


@pytest.mark.parametrize("path", FILES, ids=[path.stem for path in FILES])
def test_shipped_recipe_is_valid(path: Path):
    recipe = load_checked(str(path))  # schema, model config, unique task names
    assert recipe.name == path.stem
    assert recipe.description
    for tasks in (recipe.tasks, recipe.evaluation.tasks):
        names = [task.name for task in tasks]
        assert len(names) == len(set(names))
    if len(recipe.tasks) == 16:  # the papers' multi-task pre-training: weight / 10 is the probability
        assert math.isclose(sum(task.sampling_weight for task in recipe.tasks), 10.0, abs_tol=1e-3)
    if recipe.name.endswith("stage2"):
        assert recipe.init == f"runs/{recipe.name[:-1]}1/final"
    if recipe.stage == "prompt-tune":
        assert recipe.model.overrides["prompt"]["deep_prompt_length"] == 10
        assert all(task.subset == 0.01 for task in recipe.tasks)
    if recipe.stage != "pretrain":
        assert recipe.evaluation.tasks


def test_resolve_names_paths_and_unknown(tmp_path: Path):
    assert resolve_recipe("toyworld-tiny") == RECIPES_DIR / "toyworld-tiny.yaml"
    mine = tmp_path / "mine.yaml"
    mine.write_text("name: mine\n")
    assert resolve_recipe(str(mine)) == mine
    with pytest.raises(FileNotFoundError, match="toyworld-tiny-moe"):
        resolve_recipe("no-such-recipe")


def test_recipes_folder_from_the_environment(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("UNIPERCEIVER_RECIPES", str(tmp_path))
    try:
        assert tmp_path == importlib.reload(recipes).RECIPES_DIR
    finally:
        monkeypatch.delenv("UNIPERCEIVER_RECIPES")
        importlib.reload(recipes)
    assert recipes.RECIPES_DIR == RECIPES_DIR


def test_ls_lists_every_recipe():
    result = runner.invoke(app, ["ls"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name in shipped_names():
        assert f" {name} " in result.output
    assert "prompt-tune" in result.output


def test_show_applies_overrides():
    result = runner.invoke(app, ["show", "toyworld-tiny", "train.lr=3e-4", "tasks.0.batch_size=64",
                                 "tasks.1.batch_size=7"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["train"]["lr"] == 3e-4 and shown["train"]["betas"] == [0.9, 0.95]
    assert shown["tasks"][0]["batch_size"] == 64 and shown["tasks"][1]["batch_size"] == 7
    assert shown["tasks"][0]["mixup"] is None  # defaults are filled in


def test_show_rejects_a_bad_override():
    result = runner.invoke(app, ["show", "toyworld-tiny", "train.lr=fast"])
    assert result.exit_code == 2
    assert "train.lr" in result.output and len(result.output.strip().splitlines()) == 1


def test_cp_writes_and_refuses_to_overwrite(tmp_path: Path):
    dest = tmp_path / "mine.yaml"
    assert runner.invoke(app, ["cp", "toyworld-tiny", str(dest)]).exit_code == 0
    assert dest.read_text() == (RECIPES_DIR / "toyworld-tiny.yaml").read_text()  # comments kept
    dest.write_text("edited\n")
    result = runner.invoke(app, ["cp", "toyworld-tiny", str(dest)])
    assert result.exit_code == 2 and "--force" in result.output and dest.read_text() == "edited\n"
    assert runner.invoke(app, ["cp", "toyworld-tiny", str(dest), "--force"]).exit_code == 0
    assert dest.read_text() == (RECIPES_DIR / "toyworld-tiny.yaml").read_text()
    assert runner.invoke(app, ["cp", "toyworld-tiny-moe", str(tmp_path)]).exit_code == 0
    assert (tmp_path / "toyworld-tiny-moe.yaml").is_file()


def _toy() -> dict:
    return yaml.safe_load((RECIPES_DIR / "toyworld-tiny.yaml").read_text())


def _unknown_key(data: dict) -> None:
    data["tasks"][0]["batch"] = 3


def _wrong_type(data: dict) -> None:
    data["tasks"][1]["batch_size"] = "many"


def _missing_key(data: dict) -> None:
    del data["stage"]


def _bad_model(data: dict) -> None:
    data["model"]["overrides"]["image_size"] = 65


def _no_threads(data: dict) -> None:
    data["train"]["threads"] = 0


def _repeated_task(data: dict) -> None:
    data["tasks"][1]["name"] = data["tasks"][0]["name"]


@pytest.mark.parametrize(("change", "expected"), [
    (_unknown_key, "tasks.0.batch: unknown key"),
    (_wrong_type, "tasks.1.batch_size: Input should be a valid integer"),
    (_missing_key, "stage: Field required"),
    (_bad_model, "model: image_size 65 is not a multiple of patch_size 16"),
    (_repeated_task, "tasks: repeated task name(s) shape_classification"),
    (_no_threads, "train.threads: Input should be greater than 0"),
])
def test_validate_names_the_key_of_a_malformed_recipe(tmp_path: Path, change, expected: str):
    data = _toy()
    change(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["validate", "toyworld-tiny", str(path)])
    assert result.exit_code == 2
    assert "ok toyworld-tiny" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{path}: {expected}" in errors[0]


def test_validate_reports_bad_yaml_with_its_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nstage: [pretrain\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "is not valid YAML" in result.output


def test_validate_check_files_names_missing_data(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for split in ("images/train", "images/test", "videos/train", "text/train"):
        (tmp_path / "data" / "toyworld" / split).mkdir(parents=True)
        if split != "text/train":
            (tmp_path / "data" / "toyworld" / split / "manifest.json").write_text("{}")
    assert runner.invoke(app, ["validate", "toyworld-tiny"]).exit_code == 0  # files are not checked
    data = _toy()
    data["init"] = "runs/none/final"
    Path("mine.yaml").write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["validate", "--check-files", "mine.yaml"])
    assert result.exit_code == 2
    errors = result.output.strip().splitlines()
    assert len(errors) == 3
    assert "mine.yaml: init: runs/none/final does not exist" in errors[0]
    assert "tasks.3.data: data/toyworld/text/train holds no manifest.json" in result.output
    missing = "evaluation.tasks.4.data, evaluation.tasks.5.data, evaluation.tasks.6.data: data/toyworld/videos/test"
    assert f"{missing} does not exist" in result.output
    (tmp_path / "data" / "toyworld" / "text" / "train" / "manifest.json").write_text("{}")
    (tmp_path / "data" / "toyworld" / "videos" / "test").mkdir()
    (tmp_path / "data" / "toyworld" / "videos" / "test" / "manifest.json").write_text("{}")
    assert runner.invoke(app, ["validate", "--check-files", "toyworld-tiny"]).exit_code == 0
