"""Recipes that used to pass validation and then exhaust memory or crash: YAML aliases and repeated keys, huge files,
counts and sizes beyond any real model, values too long to print, and data sources that are pipes or URLs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from uniperceiver_cli.cli.app import app
from uniperceiver_cli.train.catalogue import RECIPES_DIR
from uniperceiver_cli.train.recipe import MAX_RECIPE_BYTES, RecipeError, local_path, read_yaml, split_path

runner = CliRunner()
TOY_PATH = RECIPES_DIR / "toyworld-tiny.yaml"
TOY_TEXT = TOY_PATH.read_text()
HUGE = 10**400


def _validate(path: Path) -> str:
    """The one error line of ``recipes validate FILE``."""
    result = runner.invoke(app, ["recipes", "validate", str(path)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), result.output
    return lines[0].removeprefix(f"error: {path}: ")


def _show(*overrides: str) -> str:
    """The one error line of ``recipes show toyworld-tiny OVERRIDES``."""
    result = runner.invoke(app, ["recipes", "show", "toyworld-tiny", *overrides])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


# ------------------------------------------------------------------------------------------------------- YAML


def test_an_alias_bomb_is_refused_at_its_first_anchor(tmp_path: Path):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    levels += [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcd", "bcde", strict=True)]
    path = tmp_path / "bomb.yaml"
    path.write_text(TOY_TEXT + "\n".join(levels) + "\n")  # 9**5 leaves, refused before any is expanded
    line = TOY_TEXT.count("\n") + 1
    assert _validate(path) == f"line {line}: anchors and aliases (&name, *name) are not allowed: write the value out"


def test_an_alias_is_refused_even_when_its_value_would_be_valid(tmp_path: Path):
    path = tmp_path / "alias.yaml"
    path.write_text(TOY_TEXT.replace("train:\n", "train: &train\n", 1))
    assert _validate(path).startswith(f"line {TOY_TEXT[:TOY_TEXT.index('train:')].count(chr(10)) + 1}: anchors")
    assert "anchors and aliases" in _show("model.overrides.moe=[&a 1, *a]")


def test_a_repeated_key_names_the_key_and_both_lines(tmp_path: Path):
    lines = TOY_TEXT.splitlines()
    first = next(i for i, text in enumerate(lines) if text.strip().startswith("steps:")) + 1
    lines.insert(first, "  steps: 1")  # the later one would win silently
    path = tmp_path / "twice.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert _validate(path) == f"line {first + 1}: key 'steps' is given twice (lines {first} and {first + 1})"
    with pytest.raises(RecipeError, match=r"^override x: line 1: key 1 is given twice \(lines 1 and 1\)$"):
        read_yaml("{1: a, 1: b}", "override x")
    assert read_yaml("{1: a, '1': b}", "x") == {1: "a", "1": "b"}  # an integer and a string are two keys


def test_a_file_over_the_size_limit_is_refused_before_parsing(tmp_path: Path):
    path = tmp_path / "big.yaml"
    path.write_text(TOY_TEXT + "# padding\n" * (MAX_RECIPE_BYTES // 10))  # valid YAML, only too large
    assert _validate(path) == f"is over {MAX_RECIPE_BYTES} bytes (1 MiB); a recipe is a few kilobytes"


@pytest.mark.parametrize(("key", "value"), [
    ("name", "x" * 100_000),
    ("tasks.0.batch_size", HUGE),
    ("evaluation.tasks.0.templates", ["no slot " * 10_000]),
    ("model.overrides.moe", {"location": "y" * 100_000}),
    ("model.preset", "z" * 100_000),
    ("train." + "k" * 100_000, 1),
])
def test_an_error_shows_at_most_80_characters_of_a_value(tmp_path: Path, key: str, value: object):
    data = yaml.safe_load(TOY_TEXT)
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = value
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(data, width=2**20))
    error = _validate(path)
    assert len(error) < 240 and "..." in error or "an integer of about 400 digits" in error, error


# --------------------------------------------------------------------------------------------- counts and sizes


@pytest.mark.parametrize(("override", "expected"), [
    ("train.steps=1000000000001", "train.steps: must be in [1, 1000000000] (got 1000000000001)"),
    (f"train.warmup_steps={HUGE}", "train.warmup_steps: must be in [0, 1000000000] (got an integer of about 400"),
    (f"tasks.0.batch_size={HUGE}", "tasks.0.batch_size: must be in [1, 1000000] (got an integer of about 400 digits)"),
    ("tasks.3.negatives=1000000000", "tasks.3.negatives: must be in [0, 10000000] (got 1000000000)"),
    ("tasks.0.sampling_weight=1.0e+308", "tasks.0.sampling_weight: must be in [0, 1000000000] (got 1e+308)"),
    ("evaluation.tasks.0.beam_size=100000", "evaluation.tasks.0.beam_size: must be in [1, 4096] (got 100000)"),
    ("train.accumulation=100000", "train.accumulation: must be in [1, 4096] (got 100000)"),
    ("engine.timeout_minutes=0", "engine.timeout_minutes: must be in (0, 10080] (got 0.0)"),
    ("evaluation.timeout_minutes=1e9", "evaluation.timeout_minutes: must be in (0, 10080] (got 1000000000"),
    (f"model.overrides.width={HUGE}", "model: width must be at most 65536, got an integer of about 400 digits"),
    ("model.overrides.width=10000000", "model: width must be at most 65536, got 10000000"),
    ("model.overrides.layers=100000", "model: layers must be at most 1024, got 100000"),
    ("model.overrides.vocab_size=1000000000", "model: vocab_size must be at most 10000000, got 1000000000"),
    ("model.overrides.layer_scale_init=1e300", "model: layer_scale_init must be a finite number in [0.0, 1000.0]"),
    ("model.overrides.moe.num_experts=100000", "model: num_experts must be at most 4096, got 100000"),
    ("model.overrides.moe.capacity_factor=1e300", "model: capacity_factor must be a finite number in (0.0, 4096]"),
    ("model.overrides.prompt.deep_prompt_length=1000000", "model: deep_prompt_length must be at most 4096"),
])
def test_a_count_or_size_beyond_its_bound_is_refused(override: str, expected: str):
    assert _show(override).startswith(f"error: {TOY_PATH}: {expected}")


def test_a_copied_recipe_with_a_huge_model_is_refused(tmp_path: Path):
    path = tmp_path / "huge.yaml"
    path.write_text(TOY_TEXT.replace("    drop_path: 0.0", f"    drop_path: 0.0\n    width: {HUGE}"))
    assert _validate(path) == "model: width must be at most 65536, got an integer of about 400 digits"
    path.write_text(TOY_TEXT.replace("layer_scale_init: 0.1", "layer_scale_init: 1.0e+300"))
    assert _validate(path) == "model: layer_scale_init must be a finite number in [0.0, 1000.0], got 1e+300"


def test_validate_prints_the_models_parameter_count():
    result = runner.invoke(app, ["recipes", "validate", "toyworld-tiny", "large-moe-pretrain-stage2"])
    assert result.exit_code == 0, result.output
    assert result.output == ("ok toyworld-tiny (model: 3,399,622 parameters)\n"
                             "ok large-moe-pretrain-stage2 (model: 1,413,535,750 parameters)\n")


# ------------------------------------------------------------------------------------------------ data sources


@pytest.mark.parametrize("source", ["pipe:sh evil.sh", "./pipe:touch x", "http://host/x", "https://host/x",
                                    "s3://bucket/x", "gs://bucket/x", "file:x"])
def test_a_pipe_or_url_is_not_a_local_path(source: str):
    with pytest.raises(ValueError, match="is a pipe or URL, not a local path"):
        local_path(source)
    if not source.startswith("http"):  # a task's split may be an http(s) URL, and nothing else remote
        with pytest.raises(ValueError, match="is a pipe or URL, not a local path"):
            split_path(source)
    else:
        assert split_path(source) == source


@pytest.mark.parametrize("path", ["data/coco/train", "/abs/pipe:x", "C:/data", "C:data", "data/x:y", "a:b"])
def test_a_local_path_is_kept(path: str):
    assert local_path(path) == path


@pytest.mark.parametrize(("override", "key"), [
    ("tasks.0.data=pipe:sh evil.sh", "tasks.0.data"),
    ("tasks.0.data=./pipe:sh evil.sh", "tasks.0.data"),
    ("data_root=https://host/data", "data_root"),
    ("evaluation.tasks.1.data=s3://bucket/x", "evaluation.tasks.1.data"),
    ("evaluation.tasks.0.labels=gs://bucket/names.txt", "evaluation.tasks.0.labels"),
    ("evaluation.tasks.3.vocabulary_from=[http://host/text]", "evaluation.tasks.3.vocabulary_from.0"),
])
def test_every_data_source_of_a_recipe_is_local(override: str, key: str):
    value = override.split("=", 1)[1].strip("[]")
    assert _show(override) == (f"error: {TOY_PATH}: {key}: {value!r} is a pipe or URL, not a local path; recipes "
                               "read local folders and files (a task's data may be an http(s) split URL)")
