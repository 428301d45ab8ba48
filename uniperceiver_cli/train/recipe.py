"""Recipes: one YAML file per run, validated into typed dataclasses.

Validation is pydantic's (strict about unknown keys and types); every error is reported as one line
naming the key path, e.g. ``tasks.0.batch_size: Input should be a valid integer``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, PositiveInt, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from uniperceiver_cli.model.config import get_config

STRICT = ConfigDict(extra="forbid")

TaskType = Literal["image_classification", "video_classification", "image_caption", "video_caption",
                   "image_retrieval", "video_retrieval", "text_mlm"]


class RecipeError(ValueError):
    """A recipe that cannot be used; the message is one line naming the file and key path."""


@dataclass(config=STRICT)
class ModelSpec:
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # any ModelConfig field


@dataclass(config=STRICT)
class MixupSpec:
    """timm Mixup/CutMix for image classification with soft-target cross entropy (stage-1 IN-22k)."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: float = 0.1


@dataclass(config=STRICT)
class TaskSpec:
    name: str
    type: TaskType
    data: str  # a converted split folder, relative to the recipe's data_root
    batch_size: int = 32
    sampling_weight: float = 1.0
    loss_weight: float = 1.0
    label_smoothing: float = 0.0
    mixup: MixupSpec | None = None
    label_set: str | None = None  # which of the split's label sets to train on (default: its classes)
    max_text_len: int = 30
    num_frames: int = 8
    frame_stride: float = 32  # video: source frames between sampled frames at 30 fps (scaled by the video's fps)
    augment: bool = True  # the reference's random augmentation; False for synthetic data (ToyWorld)
    # Captioning / MLM target set: the whole vocabulary (faithful), the tokens of the task's corpus, or
    # the batch's own tokens plus `negatives` sampled ids.
    vocabulary: Literal["full", "corpus", "sampled"] = "full"
    negatives: int = 1024
    mask_probability: float = 0.15  # text_mlm: whole-word masking rate (80% <|spe|>, 10% random, 10% kept)
    subset: float | None = None  # a fraction of the data (prompt tuning's 1%), chosen once from the seed


@dataclass(config=STRICT)
class TrainSpec:
    steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-6
    grad_clip: float = 0.1
    accumulation: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only the final bundle
    keep_checkpoints: int = 2
    num_workers: int = 0  # data-loader worker processes per task
    threads: PositiveInt | None = None  # torch compute threads in each training process (None: torch's default)


@dataclass(config=STRICT)
class EngineSpec:
    kind: Literal["single", "deepspeed"] = "single"
    deepspeed_config: str | None = None  # a DeepSpeed JSON; its batch/precision/ZeRO keys are filled from here
    zero_stage: Literal[0, 1, 2] = 0


@dataclass(config=STRICT)
class EvalTaskSpec:
    name: str
    type: TaskType
    data: str
    batch_size: int = 64
    label_set: str | None = None
    labels: str | None = None  # a file of class names (default: the split's)
    templates: list[str] | None = None
    max_samples: int | None = None
    beam_size: int = 2
    max_len: int = 21
    # Captioning: decode over the tokens of these data folders' texts only (a model trained with a
    # corpus-restricted target set); empty: the whole vocabulary.
    vocabulary_from: list[str] = field(default_factory=list)
    max_text_len: int = 50
    captions_per_item: int | None = None  # retrieval: score only each item's first captions (None: all)
    num_frames: int = 8
    frame_stride: float = 32
    views: int = 1  # spatial crops per video (1 or 3)
    clips: int = 1  # temporal clips per video; views x clips softmaxes are averaged


@dataclass(config=STRICT)
class EvalSpec:
    every: int = 0  # steps between evaluations during training; 0: only after training
    tasks: list[EvalTaskSpec] = field(default_factory=list)


@dataclass(config=STRICT)
class Recipe:
    name: str
    stage: Literal["pretrain", "finetune", "prompt-tune"]
    tasks: list[TaskSpec]
    description: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    init: str | None = None  # a bundle or an official checkpoint to start from
    data_root: str = "."
    train: TrainSpec = field(default_factory=TrainSpec)
    engine: EngineSpec = field(default_factory=EngineSpec)
    evaluation: EvalSpec = field(default_factory=EvalSpec)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _location(error: dict[str, Any]) -> str:
    return ".".join(str(part) for part in error["loc"] if not str(part).startswith("function-")) or "<root>"


def parse_value(text: str) -> Any:
    """A command-line override value, read as YAML (``[1, 2]`` -> list, ``x`` -> str); ``3e-4``, which YAML 1.1
    leaves a string, becomes a float."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Dotted ``key.path=value`` overrides (list indices are numbers: ``tasks.0.batch_size=64``)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form key.path=value")
        path, value = item.split("=", 1)
        keys = path.split(".")
        node: Any = data
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise RecipeError(f"override {path}: {'.'.join(keys[:i])} has no item {key}")
                key = int(key)
            elif not isinstance(node, dict):
                raise RecipeError(f"override {path}: {'.'.join(keys[:i])} is not a mapping")
            if last:
                node[key] = parse_value(value)
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return data


def validate(data: Any, source: str = "recipe") -> Recipe:
    """A typed recipe from plain data, whose model builds and whose task names are unique; the first problem
    is reported as one line with its key path."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping, got {type(data).__name__}")
    try:
        recipe = TypeAdapter(Recipe).validate_python(data)
    except ValidationError as e:
        first = e.errors()[0]
        message = "unknown key" if first["type"] == "unexpected_keyword_argument" else first["msg"]
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise RecipeError(f"{source}: {_location(first)}: {message}{more}") from None
    try:
        get_config(recipe.model.preset, **recipe.model.overrides)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{source}: model: {e}") from None
    for key, tasks in (("tasks", recipe.tasks), ("evaluation.tasks", recipe.evaluation.tasks)):
        names = [task.name for task in tasks]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise RecipeError(f"{source}: {key}: repeated task name(s) {', '.join(repeated)}")
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if overrides:
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping")
        data = apply_overrides(data, overrides)
    return validate(data, str(path))
