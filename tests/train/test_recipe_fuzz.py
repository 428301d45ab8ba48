"""Broken recipes drawn from a seed, through the real CLI (``uniperceiver recipes validate FILE``): every one
is reported as one line naming its key or its file, with exit code 2 and no traceback; and a broken recipe
stops the training commands before they write anything."""

from __future__ import annotations

import copy
import math
import random
import re
import string
import typing
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from pydantic import AfterValidator, TypeAdapter, ValidationError
from typer.testing import CliRunner

from uniperceiver_cli.cli.app import app
from uniperceiver_cli.train.catalogue import RECIPES_DIR
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
    validate,
)

SEED = 1234
runner = CliRunner()
TOY_TEXT = (RECIPES_DIR / "toyworld-tiny.yaml").read_text()
TOY = yaml.safe_load(TOY_TEXT)
NUM_TASKS, NUM_EVAL_TASKS = len(TOY["tasks"]), len(TOY["evaluation"]["tasks"])
VIDEO_TASK = next(i for i, task in enumerate(TOY["tasks"]) if task["type"].startswith("video_"))
BAD_NAMES = ["../../../tmp/escape", "a/b", "a\\b", "", ".hidden", "..", "-flag", "x" * 129, "two words",
             "runs/../x", "tab\there", "new\nline", "/abs"]


class Case(NamedTuple):
    id: str
    content: bytes
    expected: str  # the error line starts with "error: FILE: <expected>" (a key and its problem) ...
    keyed: bool = True  # ... or, for a file that is no recipe at all, holds it after the file's name


def _base() -> dict[str, Any]:
    """The shipped ToyWorld recipe with every nested spec present (mixup, betas), so each key can be broken."""
    data = copy.deepcopy(TOY)
    data["tasks"][0]["mixup"] = {}
    data["train"]["betas"] = [0.9, 0.95]
    return data


def _location(spec: type, rng: random.Random) -> str:
    """Where a spec sits in the base recipe (a random task for the task specs)."""
    return {Recipe: "", ModelSpec: "model", MixupSpec: "tasks.0.mixup", TrainSpec: "train", EngineSpec: "engine",
            EvalSpec: "evaluation", TaskSpec: f"tasks.{rng.randrange(NUM_TASKS)}",
            EvalTaskSpec: f"evaluation.tasks.{rng.randrange(NUM_EVAL_TASKS)}"}[spec]


def _key(location: str, name: str) -> str:
    return f"{location}.{name}" if location else name


def _set(data: Any, key: str, value: Any) -> dict[str, Any]:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[int(last) if isinstance(node, list) else last] = value
    return data


def _get(data: Any, parts: list[str]) -> Any:
    for part in parts:
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _dump(data: Any) -> bytes:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


def _inner(hint: object) -> list[object]:
    return [hint] + [inner for arg in typing.get_args(hint) for inner in _inner(arg)]


def _range(hint: object) -> tuple[Range, bool] | None:
    """A field's range and whether it is an integer, if it has one."""
    for part in _inner(hint):
        if typing.get_origin(part) is typing.Annotated:
            for meta in part.__metadata__:
                if isinstance(meta, AfterValidator) and isinstance(meta.func, Range):
                    return meta.func, typing.get_args(part)[0] is int
    return None


def _out_of_range(allowed: Range, integer: bool, rng: random.Random) -> list[Any]:
    step = 1 if integer else rng.uniform(1e-3, 10)
    values: list[Any] = [allowed.low if allowed.low_open else allowed.low - step, -rng.randint(1, 10**6), True]
    if allowed.high is not None:
        values.append(allowed.high if allowed.high_open else allowed.high + step)
    if not integer:
        values += [math.inf, -math.inf, math.nan]
    return rng.sample(values, 2)


def _wrong_type(hint: object, rng: random.Random) -> Any:
    """A value that the field's type itself refuses."""
    candidates = ["many", [1, 2], {"a": 1}, 2.5, [{"b": None}]]
    rng.shuffle(candidates)
    for value in candidates:
        try:
            TypeAdapter(hint).validate_python(value)
        except ValidationError:
            return value
    raise AssertionError(f"no wrong value for {hint}")


def _schema_cases(rng: random.Random) -> list[Case]:
    """Each ranged field out of range, each field of the wrong type, unknown and missing keys."""
    cases = []
    for spec in (Recipe, ModelSpec, MixupSpec, TaskSpec, TrainSpec, EngineSpec, EvalSpec, EvalTaskSpec):
        for name, hint in typing.get_type_hints(spec, include_extras=True).items():
            location = _location(spec, rng)
            if typing.get_origin(hint) is tuple:  # betas: break one of the pair
                name = f"{name}.{rng.randrange(len(typing.get_args(hint)))}"
                hint = typing.get_args(hint)[0]
            key = _key(location, name)
            ranged = _range(hint)
            for value in _out_of_range(*ranged, rng) if ranged else []:
                cases.append(Case(f"range-{key}={value}", _dump(_set(_base(), key, value)), f"{key}: must be"))
            cases.append(Case(f"type-{key}", _dump(_set(_base(), key, _wrong_type(hint, rng))), key))
        location = _location(spec, rng)
        unknown = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 10)))
        cases.append(Case(f"unknown-{_key(location, unknown)}", _dump(_set(_base(), _key(location, unknown), 1)),
                          f"{_key(location, unknown)}: unknown key"))
    for key in ("name", "stage", "tasks", f"tasks.{rng.randrange(NUM_TASKS)}.type",
                f"evaluation.tasks.{rng.randrange(NUM_EVAL_TASKS)}.data"):
        data = _base()
        *parents, last = key.split(".")
        _get(data, parents).pop(last)
        cases.append(Case(f"missing-{key}", _dump(data), f"{key}: Field required"))
    return cases


def _rule_cases(rng: random.Random) -> list[Case]:
    """Rules across keys: min_lr <= lr, something to train, unique and plain names, the model's limits."""
    cases = []
    for _ in range(4):
        lr = 10 ** rng.uniform(-6, -1)
        data = _set(_set(_base(), "train.lr", lr), "train.min_lr", lr * rng.uniform(1.01, 100))
        cases.append(Case(f"min_lr-above-lr-{lr:.2g}", _dump(data), "train.min_lr: must be <= train.lr"))
    zero = _base()
    for task in zero["tasks"]:
        task["sampling_weight"] = 0
    cases.append(Case("all-weights-zero", _dump(zero), "tasks: at least one task needs a sampling_weight > 0"))
    cases.append(Case("no-tasks", _dump(_set(_base(), "tasks", [])), "tasks: must hold at least one"))
    for key in ("name", f"tasks.{rng.randrange(NUM_TASKS)}.name",
                f"evaluation.tasks.{rng.randrange(NUM_EVAL_TASKS)}.name"):
        for name in rng.sample(BAD_NAMES, 6):
            cases.append(Case(f"name-{key}={name!r}", _dump(_set(_base(), key, name)),
                              f"{key}: must be a plain name"))
    for prefix, count in (("tasks", NUM_TASKS), ("evaluation.tasks", NUM_EVAL_TASKS)):
        first, second = rng.sample(range(count), 2)
        data = _base()
        _set(data, f"{prefix}.{second}.name", _get(data, [*prefix.split("."), str(first), "name"]))
        cases.append(Case(f"repeated-{prefix}", _dump(data), f"{prefix}: repeated task name(s)"))
    task = rng.randrange(NUM_TASKS)
    cases += [
        Case("long-text", _dump(_set(_base(), f"tasks.{task}.max_text_len", rng.randint(513, 10**4))),
             f"tasks.{task}.max_text_len: must be <= the model's max_text_len 512"),
        Case("many-frames", _dump(_set(_base(), f"tasks.{VIDEO_TASK}.num_frames", rng.randint(9, 64))),
             f"tasks.{VIDEO_TASK}.num_frames: must be <= the model's max_frames 8"),
        Case("views", _dump(_set(_base(), "evaluation.tasks.4.views", rng.choice([0, 2, 4, 12]))),
             "evaluation.tasks.4.views: Input should be 1 or 3"),
        Case("template", _dump(_set(_base(), "evaluation.tasks.0.templates", ["a photo of a {}.", "no slot"])),
             "evaluation.tasks.0.templates.1: must hold {}"),
        Case("preset", _dump(_set(_base(), "model.preset", "huge")), "model: unknown preset 'huge'"),
        Case("model-field", _dump(_set(_base(), "model.overrides.image_size", 65)), "model: image_size 65"),
        Case("model-unknown", _dump(_set(_base(), "model.overrides.depth", 3)), "model: unknown model config"),
        Case("non-string-key", _dump(_set(_base(), "train", {**_base()["train"], 7: 1})), "train"),
    ]
    return cases


def _syntax_error(rng: random.Random) -> str:
    """The shipped recipe with one random mistake that YAML cannot parse."""
    mistakes = ["  broken: [unclosed", "\tname: tab", 'description: "unterminated', "- item: in a mapping",
                "key: value: another", "? [complex]\n: : :", "@reserved: 1", "`tick: 1", "x: {a: 1", "]", "}{",
                "flow: [a, b]]", "%TAG ! bad"]  # anchors and aliases: the alias cases below
    lines = TOY_TEXT.splitlines()
    while True:
        at = rng.randrange(1, len(lines))
        text = "\n".join([*lines[:at], rng.choice(mistakes), *lines[at:]]) + "\n"
        try:
            yaml.safe_load(text)
        except yaml.YAMLError:
            return text


def _file_cases(rng: random.Random) -> list[Case]:
    """Whole files that are no recipe: syntax errors, empty, binary, null bytes and control characters, deep
    nesting, a YAML document that is not a mapping, a date that is no date."""
    cases = [Case(f"syntax-{i}", _syntax_error(rng).encode(), "is not valid YAML", keyed=False) for i in range(20)]
    cases += [Case(f"empty-{i}", text.encode(), "is empty", keyed=False) for i, text in
              enumerate(["", "\n\n", "# only a comment\n", "null\n", "~\n", "---\n"])]
    cases += [Case(f"not-a-mapping-{i}", text.encode(), "a recipe is a YAML mapping", keyed=False) for i, text in
              enumerate(["[1, 2]\n", "just words\n", "42\n", "- name: x\n"])]
    for i in range(8):
        blob = bytearray(rng.randbytes(rng.randint(1, 4096)))
        blob.insert(rng.randrange(len(blob) + 1), 0xFF)  # never UTF-8
        cases.append(Case(f"binary-{i}", bytes(blob), "is not a text file", keyed=False))
    cases.append(Case("png", b"\x89PNG\r\n\x1a\n" + rng.randbytes(64), "is not a text file", keyed=False))
    latin = TOY_TEXT.replace("ToyWorld", "ToyWörld").encode("latin-1")
    cases.append(Case("latin-1", latin, "is not a text file", keyed=False))
    for i in range(8):
        at = rng.randrange(len(TOY_TEXT))
        control = rng.choice(["\x00", "\x00\x00\x00", "\x01", "\x07", "\x1b", "\x7f"])
        cases.append(Case(f"control-{i}", (TOY_TEXT[:at] + control + TOY_TEXT[at:]).encode(),
                          "is not valid YAML (character #x", keyed=False))
    for i in range(6):
        depth = rng.choice([1200, 2000, 3000])  # beyond the interpreter's recursion limit (1000)
        deep = rng.choice(["[" * depth + "]" * depth, "{a: " * depth + "1" + "}" * depth])
        text = deep if i % 2 else TOY_TEXT.replace("drop_path: 0.0", f"drop_path: {deep}")
        cases.append(Case(f"deep-{depth}-{i}", text.encode(), "is nested too deeply", keyed=False))
    depth = rng.randint(5, 50)
    cases.append(Case("nested-value", _dump(_set(_base(), "train.steps", _nest(depth))), "train.steps"))
    cases.append(Case("date", TOY_TEXT.replace("description:", "description: 2024-13-45 #").encode(),
                      "is not valid YAML (month must be in 1..12)", keyed=False))
    lines = TOY_TEXT.splitlines()
    keyed = [n for n, line in enumerate(lines) if re.fullmatch(r" *[a-z_]+: .*", line)]  # "key: value" lines
    for i in range(4):  # an anchor or an alias beside any key, any key given twice
        at = rng.choice(keyed)
        indent = " " * (len(lines[at]) - len(lines[at].lstrip()))
        extra = rng.choice([f"{indent}anchored: &x{i} [1, 2]", f"{indent}aliased: *x{i}"])
        cases.append(Case(f"alias-{i}", "\n".join([*lines[:at], extra, *lines[at:]]).encode(),
                          f"line {at + 1}: anchors and aliases (&name, *name) are not allowed", keyed=False))
        at = rng.choice(keyed)
        cases.append(Case(f"repeated-key-{i}", "\n".join([*lines[:at + 1], lines[at], *lines[at + 1:]]).encode(),
                          f"line {at + 2}: key {lines[at].split(':')[0].strip()!r} is given twice", keyed=False))
    cases.append(Case("too-large", (TOY_TEXT + "#" * 2**20).encode(), "is over 1048576 bytes", keyed=False))
    return cases


def _nest(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _cases() -> list[Case]:
    rng = random.Random(SEED)
    return _schema_cases(rng) + _rule_cases(rng) + _file_cases(rng)


CASES = _cases()


def test_there_are_enough_cases_and_the_unbroken_base_is_valid():
    assert len(CASES) >= 150
    assert len({case.id for case in CASES}) == len(CASES)
    validate(_base())  # so every case fails because of its own change


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_broken_recipe_is_one_line_naming_its_key_or_file(tmp_path: Path, case: Case):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(case.content)
    result = runner.invoke(app, ["recipes", "validate", str(path)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), result.output
    if case.keyed:
        assert lines[0].startswith(f"error: {path}: {case.expected}"), lines[0]
    else:
        assert case.expected in lines[0], lines[0]


@pytest.mark.parametrize(("command", "change"), [
    ("pretrain", {"train": {"steps": 0}}),
    ("pretrain", {"name": "../../escape"}),
    ("pretrain", {"tasks": []}),
    ("finetune", {"stage": "finetune", "init": "tiny", "train": {"lr": math.inf}}),
])
def test_a_broken_recipe_stops_training_before_it_writes_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   command: str, change: dict[str, Any]):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    data = _base()
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    Path("broken.yaml").write_bytes(_dump(data))
    for extra in ([], ["--run-dir", "mine"]):
        result = runner.invoke(app, [command, "--recipe", "broken.yaml", *extra])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        lines = result.output.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: broken.yaml: "), result.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["broken.yaml", "work"]  # no runs/, mine/ or escape


@pytest.mark.parametrize("override", ["train.lr=[1", "train.lr={a: ", "model.overrides.width=\x00",
                                      "train.steps=" + "[" * 3000, "tasks.0.name=../x", "train.accumulation=0"])
def test_a_broken_override_is_one_line_naming_it(override: str):
    result = runner.invoke(app, ["recipes", "show", "toyworld-tiny", override])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and override.split("=")[0] in lines[0], result.output
