"""The shipped recipes and ``uniperceiver recipes``: every file validates, the CLI lists, shows, copies and
reports malformed recipes and missing data in one line each."""

import dataclasses
import importlib
import json
import math
import re
import shutil
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import AfterValidator
from typer.testing import CliRunner

from uniperceiver_cli import create_model, save_bundle
from uniperceiver_cli.cli.recipes import app
from uniperceiver_cli.data.toyworld import SHAPES, generate
from uniperceiver_cli.train import catalogue
from uniperceiver_cli.train.catalogue import RECIPES_DIR, load_checked, resolve_recipe, shipped_names
from uniperceiver_cli.train.recipe import (
    EngineSpec,
    EvalSpec,
    EvalTaskSpec,
    MixupSpec,
    ModelSpec,
    Range,
    Recipe,
    TaskSpec,
    TrainSpec,
)

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
    assert {f"base-finetune-glue-{task}" for task in ("sst2", "cola", "rte", "mrpc", "qqp", "qnli", "mnli")} <= names


def test_glue_recipes_take_the_references_settings():
    for task, lr in (("rte", 2e-5), ("sst2", 1e-5), ("mnli", 1e-5)):
        recipe = load_checked(f"base-finetune-glue-{task}")
        spec, train = recipe.tasks[0], recipe.train
        assert (spec.type, spec.max_text_len, spec.label_smoothing) == ("text_classification", 256, 0.1)
        assert (train.lr, train.betas, train.eps, train.weight_decay, train.grad_clip) == (lr, (0.9, 0.98), 1e-8,
                                                                                          0.1, 0.5)
    assert [t.data for t in load_checked("base-finetune-glue-mnli").evaluation.tasks] == [
        "glue/MNLI/dev_matched", "glue/MNLI/dev_mismatched"]


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
        assert tmp_path == importlib.reload(catalogue).RECIPES_DIR
    finally:
        monkeypatch.delenv("UNIPERCEIVER_RECIPES")
        importlib.reload(catalogue)
    assert catalogue.RECIPES_DIR == RECIPES_DIR


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
    (_no_threads, "train.threads: must be in [1, 4096] (got 0)"),
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


ZERO_WEIGHTS = [f"tasks.{i}.sampling_weight=0" for i in range(5)]


@pytest.mark.parametrize(("overrides", "expected"), [
    (["train.steps=0"], "train.steps: must be in [1, 1000000000] (got 0)"),
    (["train.steps=-1"], "train.steps: must be in [1, 1000000000] (got -1)"),
    (["train.lr=.inf"], "train.lr: must be a finite number > 0 (got inf)"),
    (["train.accumulation=0"], "train.accumulation: must be in [1, 4096] (got 0)"),
    (["train.log_every=0"], "train.log_every: must be in [1, 1000000000] (got 0)"),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints: must be in [1, 1000000000] (got 0)"),
    (["train.checkpoint_every=-1"], "train.checkpoint_every: must be in [0, 1000000000] (got -1)"),
    (["train.betas=[0.9, 1.0]"], "train.betas.1: must be in [0, 1) (got 1.0)"),
    (["train.steps=yes"], "train.steps: must be a number (got True)"),
    (["tasks.3.max_text_len=0"], "tasks.3.max_text_len: must be in [1, 65536] (got 0)"),
    (["tasks.4.frame_stride=-1"], "tasks.4.frame_stride: must be in (0, 1000000] (got -1.0)"),
    (["tasks.3.mask_probability=2"], "tasks.3.mask_probability: must be in [0, 1] (got 2.0)"),
    (["tasks.0.label_smoothing=2"], "tasks.0.label_smoothing: must be in [0, 1] (got 2.0)"),
    (["tasks.0.subset=5"], "tasks.0.subset: must be in (0, 1] (got 5.0)"),
    (["train.min_lr=0.1"], "train.min_lr: must be <= train.lr 0.001, where the cosine decay starts (got 0.1)"),
    (ZERO_WEIGHTS, "tasks: at least one task needs a sampling_weight > 0 (every weight is 0)"),
    (["tasks=[]"], "tasks: must hold at least one training task"),
    (["evaluation.tasks.4.views=2"], "evaluation.tasks.4.views: Input should be 1 or 3"),
    (["tasks.3.max_text_len=513"], "tasks.3.max_text_len: must be <= the model's max_text_len 512 (got 513)"),
    (["name=../../../tmp/escape"], "name: must be a plain name: at most 128 letters, digits, '_', '-' and '.', "
                                   "not starting with '.' or '-', no '..' (got '../../../tmp/escape')"),
    (["evaluation.tasks.0.name=a/b"], "evaluation.tasks.0.name: must be a plain name"),
    (["evaluation.tasks.3.vocabulary=full"], "evaluation.tasks.3.vocabulary_from: names the tokens to decode over, "
                                             "and vocabulary: full says all of them: give one"),
])
def test_every_value_is_checked(overrides: list[str], expected: str):
    result = runner.invoke(app, ["show", "toyworld-tiny", *overrides])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {RECIPES_DIR / 'toyworld-tiny.yaml'}: {expected}")
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(("content", "expected"), [
    (b"", "is empty; a recipe is a YAML mapping"),
    (b"# nothing but a comment\n", "is empty; a recipe is a YAML mapping"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "is not a text file (byte 0x89 at offset 0 is not UTF-8)"),
    (b"name: mine\nstage: pre\x00train\n", "line 2 is not valid YAML (character #x0000 is not allowed)"),
    (b"[" * 5000 + b"]" * 5000, "is nested too deeply to be a recipe"),
    (b"name: mine\ntasks: [{name: a}]]\n", "line 2 is not valid YAML (while parsing a block mapping; expected "
                                           "<block end>, but found ']')"),
])
def test_an_unreadable_file_is_one_line_naming_it(tmp_path: Path, content: bytes, expected: str):
    path = tmp_path / "mine.yaml"
    path.write_bytes(content)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert result.output == f"error: {path}: {expected}\n"


# ------------------------------------------------------------------------------------------ --check-files


@pytest.fixture(scope="module")
def toyworld(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny ToyWorld: real shards and manifests for every split the toyworld recipes read."""
    root = tmp_path_factory.mktemp("toyworld")
    generate(root, size="tiny", image_size=32, num_frames=4, min_shards=2, progress=False)
    return root


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toyworld: Path) -> Path:
    """The current directory, holding data/toyworld: a copy of the tiny world that a test may break."""
    shutil.copytree(toyworld, tmp_path / "data" / "toyworld")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write(data: dict, name: str = "mine.yaml") -> str:
    Path(name).write_text(yaml.safe_dump(data))
    return name


def _errors(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_validate_check_files_names_missing_data(workdir: Path, toyworld: Path):
    world = workdir / "data" / "toyworld"
    (world / "text" / "train" / "manifest.json").unlink()
    shutil.rmtree(world / "videos" / "test")
    assert runner.invoke(app, ["validate", "toyworld-tiny"]).exit_code == 0  # files are not checked
    data = _toy()
    data["init"] = "runs/none/final"
    result = runner.invoke(app, ["validate", "--check-files", _write(data)])
    assert result.exit_code == 2
    errors = result.output.strip().splitlines()
    assert len(errors) == 3
    assert "mine.yaml: init: runs/none/final does not exist" in errors[0]
    text = ("tasks.3.data, evaluation.tasks.4.vocabulary_from.0, evaluation.tasks.6.vocabulary_from.1: "
            "data/toyworld/text/train")  # every key naming it
    assert f"{text} holds no manifest.json" in result.output
    missing = "evaluation.tasks.5.data, evaluation.tasks.6.data, evaluation.tasks.7.data: data/toyworld/videos/test"
    assert f"{missing} does not exist" in result.output
    shutil.copytree(toyworld, world, dirs_exist_ok=True)
    result = runner.invoke(app, ["validate", "--check-files", "toyworld-tiny"])
    assert result.exit_code == 0 and result.output == "ok toyworld-tiny (model: 3,399,622 parameters)\n"


def test_check_files_checks_types_label_sets_and_labels(workdir: Path):
    world = workdir / "data" / "toyworld"
    unnamed = json.loads((world / "images" / "val" / "manifest.json").read_text())
    unnamed["classes"] = None
    (world / "images" / "val" / "manifest.json").write_text(json.dumps(unnamed))
    (world / "text" / "val" / "manifest.json").write_text("{}")
    data = _toy()
    data["tasks"][0]["label_set"] = "size"
    data["tasks"][3]["type"] = "image_caption"  # on the text split
    data["evaluation"]["tasks"][1]["labels"] = "colours.txt"
    data["evaluation"]["tasks"] += [
        {"name": "unnamed", "type": "image_classification", "data": "images/val"},
        {"name": "listed", "type": "image_classification", "data": "images/val", "labels": "names.txt"},
        {"name": "mlm_val", "type": "text_mlm", "data": "text/val"},
    ]
    (world / "names.txt").write_text("".join(f"{name}\n" for name in SHAPES))
    data["engine"]["deepspeed_config"] = "ds.json"
    result = runner.invoke(app, ["validate", "--check-files", _write(data)])
    assert result.exit_code == 2
    assert _errors(result) == [
        "error: mine.yaml: engine.deepspeed_config: ds.json does not exist",
        "error: mine.yaml: evaluation.tasks.4.data, evaluation.tasks.11.data: data/toyworld/text/val/manifest.json "
        "is not a valid shard "
        "manifest: format is None, not 'uniperceiver-shards'",
        "error: mine.yaml: tasks.0.label_set: label set 'size' is not in toyworld-images/train; it has: shape, colour",
        "error: mine.yaml: tasks.3.type: data/toyworld/text/train serves text_mlm, not image_caption",
        "error: mine.yaml: evaluation.tasks.1.labels: data/toyworld/colours.txt does not exist",
        "error: mine.yaml: evaluation.tasks.9: data/toyworld/images/val names no classes; set label_set or labels",
    ]


@pytest.mark.parametrize("data_root", [".", "./"])
def test_a_folder_named_like_a_pipe_is_refused(workdir: Path, data_root: str):
    # A real split under a name that webdataset would run as a shell command: the recipe is refused, nothing runs.
    planted = workdir / "pipe:touch MARKER"
    shutil.copytree(workdir / "data" / "toyworld" / "images" / "train", planted)
    data = _toy()
    data["data_root"] = data_root
    for task in data["tasks"] + data["evaluation"]["tasks"]:
        task["data"] = f"data/toyworld/{task['data']}"
    data["tasks"][0]["data"] = "pipe:touch MARKER"
    data["evaluation"]["tasks"][3]["vocabulary_from"] = ["./pipe:touch MARKER"]
    result = runner.invoke(app, ["validate", "--check-files", _write(data)])
    assert result.exit_code == 2
    assert _errors(result) == ["error: mine.yaml: tasks.0.data: 'pipe:touch MARKER' is a pipe or URL, not a local "
                               "path; recipes read local folders and files (a task's data may be an http(s) split "
                               "URL) (and 1 more)"]
    data["tasks"][0]["data"] = "data/toyworld/images/train"
    result = runner.invoke(app, ["validate", "--check-files", _write(data)])
    assert _errors(result) == ["error: mine.yaml: evaluation.tasks.3.vocabulary_from.0: './pipe:touch MARKER' is a "
                               "pipe or URL, not a local path; recipes read local folders and files (a task's data "
                               "may be an http(s) split URL)"]
    assert not list(workdir.rglob("MARKER"))


def test_check_files_names_a_shard_linked_out_of_its_folder_and_a_file_posing_as_a_split(workdir: Path):
    split = workdir / "linked"
    shutil.copytree(workdir / "data" / "toyworld" / "images" / "train", split)
    shard = sorted(split.glob("shard-*.tar"))[0]
    outside = workdir / "outside.tar"
    shard.rename(outside)
    shard.symlink_to(outside)
    (workdir / "m::pipe:touch MARKER").write_text((split / "manifest.json").read_text())  # a file, not a folder
    data = _toy()
    data["data_root"] = "."
    for task in data["tasks"] + data["evaluation"]["tasks"]:
        task["data"] = f"data/toyworld/{task['data']}"
    data["tasks"][0]["data"] = "linked"
    data["tasks"][1]["data"] = "m::pipe:touch MARKER"
    data["evaluation"]["tasks"] = []
    result = runner.invoke(app, ["validate", "--check-files", _write(data)])
    assert result.exit_code == 2
    errors = " ".join(_errors(result))
    assert f"tasks.0.data: linked/manifest.json: shard '{shard.name}' resolves to {outside}, outside" in errors, errors
    assert "tasks.1.data: m::pipe:touch MARKER does not exist" in errors, errors
    assert not list(workdir.rglob("MARKER"))


def test_check_files_loads_init_into_the_recipes_model(workdir: Path):
    save_bundle(create_model("tiny"), workdir / "tiny")
    data = _toy()
    data["init"] = "tiny"
    assert runner.invoke(app, ["validate", "--check-files", _write(data)]).exit_code == 0
    data.update(stage="prompt-tune")
    data["model"]["overrides"]["prompt"] = {"deep_prompt_length": 2, "spe_bias": True}
    result = runner.invoke(app, ["validate", "--check-files", _write(data)])
    assert result.exit_code == 0, result.output  # prompt parameters the bundle lacks start fresh, as in training
    moe = yaml.safe_load((RECIPES_DIR / "toyworld-tiny-moe.yaml").read_text())
    moe["init"] = "tiny"
    result = runner.invoke(app, ["validate", "--check-files", _write(moe)])
    assert result.exit_code == 2
    errors = _errors(result)
    assert len(errors) == 1 and "mine.yaml: init: init tiny does not fit the recipe's model: " in errors[0]
    assert "missing key(s): blocks.0.attn.gate.router.weight" in errors[0]  # the experts' routers
    base = yaml.safe_load((RECIPES_DIR / "base-pretrain-stage2.yaml").read_text())
    base["init"] = "tiny"  # the tiny bundle passed as a BASE model's start until finetune began
    result = runner.invoke(app, ["validate", "--check-files", _write(base)])
    assert result.exit_code == 2
    assert "mine.yaml: init: init tiny does not fit the recipe's model" in _errors(result)[0]
    assert "wrong shape key(s): blocks.0.attn.out.bias: checkpoint (64,) vs model (768,)" in _errors(result)[0]
    (workdir / "tiny" / "config.json").write_text("{")
    data = _toy()
    data["init"] = "tiny"
    result = runner.invoke(app, ["validate", "--check-files", _write(data)])
    assert result.exit_code == 2 and len(_errors(result)) == 1
    assert "mine.yaml: init: cannot read tiny/config.json" in _errors(result)[0]


# ------------------------------------------------------------------------------------------ the documentation

SECTIONS = {Recipe: "Top level", ModelSpec: "`model`", TaskSpec: "`tasks[]`", MixupSpec: "`tasks[].mixup`",
            TrainSpec: "`train`", EngineSpec: "`engine`", EvalSpec: "`evaluation`",
            EvalTaskSpec: "`evaluation.tasks[]`"}


def _inner(hint: object) -> list[object]:
    """A type hint and every type nested in it (``list[X]``, ``X | None``, ``Annotated[X, ...]``)."""
    return [hint] + [inner for arg in typing.get_args(hint) for inner in _inner(arg)]


def _ranges(hint: object) -> list[Range]:
    return [meta.func for part in _inner(hint) if typing.get_origin(part) is typing.Annotated
            for meta in part.__metadata__ if isinstance(meta, AfterValidator) and isinstance(meta.func, Range)]


def test_every_key_is_documented_with_its_range():
    text = (Path(__file__).resolve().parents[2] / "docs" / "recipes.md").read_text()
    sections = {title: body for title, body in re.findall(r"^### (.+)\n((?:(?!^#).*\n)*)", text, re.MULTILINE)}
    seen, todo = set(), [Recipe]
    while todo:
        spec = todo.pop()
        seen.add(spec)
        assert spec in SECTIONS, f"{spec.__name__} has no section in docs/recipes.md"
        rows = [line for line in sections[SECTIONS[spec]].splitlines() if line.startswith("| `")]
        for name, hint in typing.get_type_hints(spec, include_extras=True).items():
            row = next((r for r in rows if f"`{name}`" in r.split(" | ")[0]), None)
            assert row is not None, f"{SECTIONS[spec]}: {name} is not documented"
            for allowed in _ranges(hint):
                assert str(allowed) in row, f"{SECTIONS[spec]}: {name}'s range {allowed} is not documented"
            todo += [t for t in _inner(hint) if isinstance(t, type) and dataclasses.is_dataclass(t) and t not in seen]
    assert seen == set(SECTIONS)
