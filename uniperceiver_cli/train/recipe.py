"""Recipes: one YAML file per run, validated into typed dataclasses.

Validation is pydantic's (strict about unknown keys, types and ranges); every error is reported as one line
naming the file and key path, e.g. ``recipe.yaml: train.steps: must be >= 1 (got 0)``.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.dataclasses import dataclass

from uniperceiver_cli.data.shards import is_remote, is_split_url
from uniperceiver_cli.model.config import LIMITS, ModelConfig, trained_config
from uniperceiver_cli.task_types import TASKS
from uniperceiver_cli.text_files import read_small, shorten, shown
from uniperceiver_cli.text_files import read_yaml as _read_yaml

STRICT = ConfigDict(extra="forbid")
MAX_RECIPE_BYTES = 2**20  # a recipe is a few kilobytes (the largest shipped one, 7 KB)

TaskType = Literal[tuple(TASKS)]


class RecipeError(ValueError):
    """A recipe that cannot be used; the message is one line naming the file and key path."""


class Range(NamedTuple):
    """The interval a number must lie in (pydantic calls it after the type check); bounds are inclusive unless
    open. A violation reads ``must be in [0, 1] (got 2.0)``."""

    low: int
    high: int | None = None  # None: unbounded (floats only: every count and size has a bound)
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"

    def __call__(self, value: float) -> float:
        # nan fails every comparison and inf passes some: checked on its own (ints are finite; math.isfinite
        # overflows on a 400-digit one)
        finite = not isinstance(value, float) or math.isfinite(value)
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if not (finite and above and below):
            raise ValueError(f"must be {'' if finite else 'a finite number '}{self} (got {shown(value)})")
        return value


def number(value: Any) -> Any:
    """Refuse booleans, which pydantic would take as 1 and 0 (YAML reads yes, no, on and off as booleans)."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number (got {value})")
    return value


NUMBER = BeforeValidator(number)
# Every count has a bound, far beyond any real run, so that a typo (10**400) is refused before anything is built.
MAX_COUNT = 10**9  # steps, intervals, samples
Count = Annotated[int, NUMBER, AfterValidator(Range(1, MAX_COUNT))]
NonNegativeInt = Annotated[int, NUMBER, AfterValidator(Range(0, MAX_COUNT))]
BatchSize = Annotated[int, NUMBER, AfterValidator(Range(1, 10**6))]
Few = Annotated[int, NUMBER, AfterValidator(Range(1, 4096))]  # accumulation, threads, beams, clips, expert groups
Workers = Annotated[int, NUMBER, AfterValidator(Range(0, 1024))]
Negatives = Annotated[int, NUMBER, AfterValidator(Range(0, LIMITS["vocab_size"]))]
TextLength = Annotated[int, NUMBER, AfterValidator(Range(1, LIMITS["max_text_len"]))]  # also <= the model's
PROMPT_LENGTHS = {"text_classification": 256, "vqa": 23}  # the reference's GLUE and VQA lengths, by task family
Frames = Annotated[int, NUMBER, AfterValidator(Range(1, LIMITS["max_frames"]))]  # also <= the model's
Seed = Annotated[int, NUMBER, AfterValidator(Range(0, 2**32 - 1))]  # numpy takes 32-bit seeds
Positive = Annotated[float, NUMBER, AfterValidator(Range(0, low_open=True))]
Stride = Annotated[float, NUMBER, AfterValidator(Range(0, 10**6, low_open=True))]
Weight = Annotated[float, NUMBER, AfterValidator(Range(0, MAX_COUNT))]  # sampling weights: their sum stays finite
NonNegative = Annotated[float, NUMBER, AfterValidator(Range(0))]
Probability = Annotated[float, NUMBER, AfterValidator(Range(0, 1))]
Fraction = Annotated[float, NUMBER, AfterValidator(Range(0, 1, low_open=True))]
Beta = Annotated[float, NUMBER, AfterValidator(Range(0, 1, high_open=True))]
Minutes = Annotated[float, NUMBER, AfterValidator(Range(0, 7 * 24 * 60, low_open=True))]  # up to a week

# One path component: a recipe name becomes runs/<name>, an evaluation task's name eval/<step>/<name>.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def plain_name(value: str) -> str:
    if not PLAIN_NAME.fullmatch(value) or ".." in value:
        raise ValueError("must be a plain name: at most 128 letters, digits, '_', '-' and '.', not starting with '.' "
                         f"or '-', no '..' (got {shown(value)})")
    return value


def template(value: str) -> str:
    if "{}" not in value:
        raise ValueError(f"must hold {{}} where the class name goes (got {shown(value)})")
    return value


# A URL scheme or webdataset's "pipe:" (two or more characters before the colon, so not a drive letter such as C:).
def local_path(value: str) -> str:
    """Refuse a pipe or URL: the data loader would run or fetch it. Checked as the path is joined (``./pipe:x`` is
    ``pipe:x``)."""
    if is_remote(str(Path(value))):
        raise ValueError(f"{shown(value)} is a pipe or URL, not a local path; recipes read local folders and files "
                         f"(a task's data may be an http(s) split URL)")
    return value


def split_path(value: str) -> str:
    """A task's split: a local folder, or the http(s) URL of a converted split. The URL is opened only where the user
    set ``UNIPERCEIVER_STREAMING=1`` (a recipe cannot); a pipe or another scheme is refused as :func:`local_path`."""
    return value if is_split_url(value) else local_path(value)


Name = Annotated[str, AfterValidator(plain_name)]
Template = Annotated[str, AfterValidator(template)]
LocalPath = Annotated[str, AfterValidator(local_path)]
SplitPath = Annotated[str, AfterValidator(split_path)]


@dataclass(config=STRICT)
class ModelSpec:
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # any ModelConfig field


@dataclass(config=STRICT)
class MixupSpec:
    """timm Mixup/CutMix for image classification with soft-target cross entropy (stage-1 IN-22k)."""

    mixup_alpha: NonNegative = 0.8  # 0 turns mixup off
    cutmix_alpha: NonNegative = 1.0  # 0 turns cutmix off
    prob: Probability = 1.0
    switch_prob: Probability = 0.5
    mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: Probability = 0.1


@dataclass(config=STRICT)
class TaskSpec:
    name: Name
    type: TaskType
    data: SplitPath  # a converted split folder, relative to the recipe's data_root, or an http(s) split URL
    batch_size: BatchSize = 32
    sampling_weight: Weight = 1.0  # 0: never drawn (another task must have a positive weight)
    loss_weight: NonNegative = 1.0
    label_smoothing: Probability = 0.0
    mixup: MixupSpec | None = None
    label_set: str | None = None  # which of the split's label sets to train on (default: its classes)
    max_text_len: TextLength | None = None  # default: 30, or the type's prompt length (PROMPT_LENGTHS)
    num_frames: Frames = 8
    frame_stride: Stride = 32  # video: source frames between sampled frames at 30 fps (scaled by the video's fps)
    augment: bool = True  # the reference's random augmentation; False for synthetic data (ToyWorld)
    # Captioning / MLM target set: the whole vocabulary (faithful), the tokens of the task's corpus, or
    # the batch's own tokens plus `negatives` sampled ids.
    vocabulary: Literal["full", "corpus", "sampled"] = "full"
    negatives: Negatives = 1024
    mask_probability: Probability = 0.15  # text_mlm: whole-word masking rate (80% <|spe|>, 10% random, 10% kept)
    subset: Fraction | None = None  # a fraction of the data (prompt tuning's 1%), chosen once from the seed
    # Captioning and retrieval: the subset draws (item, caption) pairs (the reference's MSVD) or items with all their
    # captions (its COCO and Flickr30k).
    subset_by: Literal["caption", "item"] = "caption"
    # Retrieval under several processes: every process's features serve as negatives (the reference's
    # FEATURE_GATHER, on in its retrieval fine-tuning), without gradient through the other processes'.
    gather_negatives: bool = False
    # VQA: train on one answer drawn in proportion to the answers' scores (the reference's single-class mode), or
    # on every answer at once, its score normalised into a target distribution ("soft").
    answer_targets: Literal["sample", "soft"] = "sample"

    @field_validator("subset_by")
    @classmethod
    def _captioned_only(cls, unit: str, info: ValidationInfo) -> str:
        kind = info.data.get("type")
        if unit != "caption" and kind is not None and TASKS[kind].family not in ("caption", "retrieval"):
            raise ValueError(f"chooses how a captioned split is drawn; {kind} is not captioning or retrieval")
        return unit

    @field_validator("gather_negatives")
    @classmethod
    def _retrieval_only(cls, gather: bool, info: ValidationInfo) -> bool:
        kind = info.data.get("type")
        if gather and kind is not None and TASKS[kind].family != "retrieval":
            raise ValueError(f"gathers retrieval negatives; {kind} is not a retrieval task")
        return gather

    @field_validator("answer_targets")
    @classmethod
    def _vqa_only(cls, targets: str, info: ValidationInfo) -> str:
        kind = info.data.get("type")
        if targets != "sample" and kind is not None and TASKS[kind].family != "vqa":
            raise ValueError(f"sets VQA answer targets; {kind} is not a VQA task")
        if targets == "soft" and info.data.get("label_smoothing"):
            raise ValueError("soft answer targets are the scores themselves; label_smoothing does not apply")
        return targets

    @field_validator("mixup")
    @classmethod
    def _classification_only(cls, mixup: MixupSpec | None, info: ValidationInfo) -> MixupSpec | None:
        kind = info.data.get("type")
        if mixup is not None and kind is not None and kind != "image_classification":
            raise ValueError(f"mixes images of a classification batch; {kind} is not image classification")
        return mixup

    def __post_init__(self) -> None:
        if self.max_text_len is None:
            self.max_text_len = PROMPT_LENGTHS.get(TASKS[self.type].family, 30)


@dataclass(config=STRICT)
class TrainSpec:
    steps: Count = 1000
    lr: Positive = 1e-3
    min_lr: NonNegative = 1e-6  # at most lr (checked below)
    warmup_steps: NonNegativeInt = 0  # more than steps is allowed: a shortened run stays in warm-up
    weight_decay: NonNegative = 0.05
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    eps: Positive = 1e-6
    grad_clip: NonNegative = 0.1  # 0: no clipping
    accumulation: Few = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: Seed = 0
    log_every: Count = 10
    checkpoint_every: NonNegativeInt = 0  # 0: only the final bundle
    keep_checkpoints: Count = 2
    num_workers: Workers = 0  # data-loader worker processes of each training process, shared by its tasks
    # Several processes: a target set of at least this many rows shared by every process (the vocabulary of
    # vocabulary: full or corpus, class names) is encoded split across them; 0: never split.
    split_targets: NonNegativeInt = 1024
    # torch compute threads in each training process: a count, auto (the process's cores less the loader
    # workers, at least one) or None (torch's default)
    threads: Few | Literal["auto"] | None = "auto"
    # Token and context routing: weights of the load-balancing loss and the router z-loss added to each task loss.
    moe_balance_weight: NonNegative = 0.01
    moe_z_weight: NonNegative = 0.001
    # Keep only each encoder block's inputs for the backward, which runs the block again: less memory, more time.
    activation_checkpointing: bool = False
    # torch.compile each encoder block (one graph serves every layer); text batches are then padded to a multiple
    # of 8 tokens, so the task mix stays within the recompile limit. The first steps of each task shape compile.
    compile: bool = False
    # On CUDA, float32 matmuls and convolutions in TensorFloat-32 (fp32 runs, and what autocast leaves in fp32).
    tf32: bool = True
    # Where the logged values go besides metrics.jsonl (train/trackers.py); wandb and mlflow are optional extras.
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, trackers: list[str]) -> list[str]:
        if len(set(trackers)) != len(trackers):
            raise ValueError(f"names a tracker twice ({', '.join(trackers)})")
        return trackers

    @field_validator("min_lr")
    @classmethod
    def _at_most_lr(cls, min_lr: float, info: ValidationInfo) -> float:
        lr = info.data.get("lr")  # absent when lr itself was invalid: that error is reported instead
        if lr is not None and min_lr > lr:
            raise ValueError(f"must be <= train.lr {lr!r}, where the cosine decay starts (got {min_lr!r})")
        return min_lr


@dataclass(config=STRICT)
class EngineSpec:
    kind: Literal["single", "deepspeed"] = "single"
    deepspeed_config: str | None = None  # a DeepSpeed JSON; its batch/precision/ZeRO keys are filled from here
    zero_stage: Literal[0, 1, 2] = 0
    # Expert parallelism (deepspeed): each process holds num_experts / expert_parallel experts of every MoE
    # layer. It must divide the model's experts and the number of processes (checked when training starts).
    expert_parallel: Few = 1
    # How long a collective waits for the other processes before the run fails (torch.distributed's timeout).
    timeout_minutes: Minutes = 30.0

    @field_validator("expert_parallel")
    @classmethod
    def _needs_deepspeed(cls, size: int, info: ValidationInfo) -> int:
        if size > 1 and info.data.get("kind") != "deepspeed":
            raise ValueError(f"expert parallelism ({size}) runs under DeepSpeed: set engine.kind: deepspeed")
        return size


@dataclass(config=STRICT)
class EvalTaskSpec:
    name: Name
    type: TaskType
    data: SplitPath
    batch_size: BatchSize = 64
    label_set: str | None = None
    labels: LocalPath | None = None  # a file of class names (default: the split's)
    templates: list[Template] | None = None
    max_samples: Count | None = None
    beam_size: Few = 2
    max_len: TextLength = 21
    # Captioning: decode over the tokens the model's caption task trained on (as recorded on the model; all when
    # it trained on all) or over all of them; vocabulary_from names data folders whose texts' tokens to use (MLM:
    # score the masked tokens over those tokens only; without it, over the whole vocabulary).
    vocabulary: Literal["trained", "full"] = "trained"
    vocabulary_from: list[LocalPath] = field(default_factory=list)  # not with vocabulary: full (checked below)
    max_text_len: TextLength | None = None  # default: 50, or the type's prompt length (PROMPT_LENGTHS)
    captions_per_item: Count | None = None  # retrieval: score only each item's first captions (None: all)
    num_frames: Frames = 8
    frame_stride: Stride = 32
    views: Literal[1, 3] = 1  # spatial crops per video: the centre, or the start, centre and end
    clips: Few = 1  # temporal clips per video; views x clips softmaxes are averaged

    @field_validator("vocabulary_from")
    @classmethod
    def _not_with_full(cls, folders: list[str], info: ValidationInfo) -> list[str]:
        if folders and info.data.get("vocabulary") == "full":
            raise ValueError("names the tokens to decode over, and vocabulary: full says all of them: give one")
        return folders

    def __post_init__(self) -> None:
        if self.max_text_len is None:
            self.max_text_len = PROMPT_LENGTHS.get(TASKS[self.type].family, 50)


@dataclass(config=STRICT)
class EvalSpec:
    every: NonNegativeInt = 0  # steps between evaluations during training; 0: only after training
    # How long the other processes wait for the main process's evaluation during training (several processes).
    timeout_minutes: Minutes = 1440.0
    tasks: list[EvalTaskSpec] = field(default_factory=list)


@dataclass(config=STRICT)
class Recipe:
    name: Name
    stage: Literal["pretrain", "finetune", "prompt-tune"]
    tasks: list[TaskSpec]
    description: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    # A bundle, run, training checkpoint, official file or released model's name (downloaded) to start from; never a
    # URL or hf-hub: name (a recipe does not reach the network: export such a model to a folder first).
    init: LocalPath | None = None
    data_root: LocalPath = "."
    train: TrainSpec = field(default_factory=TrainSpec)
    engine: EngineSpec = field(default_factory=EngineSpec)
    evaluation: EvalSpec = field(default_factory=EvalSpec)

    @field_validator("tasks")
    @classmethod
    def _something_to_train(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        if not tasks:
            raise ValueError("must hold at least one training task")
        if not any(task.sampling_weight > 0 for task in tasks):
            raise ValueError("at least one task needs a sampling_weight > 0 (every weight is 0)")
        return tasks

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_config(self) -> ModelConfig:
        """The model this recipe trains: its preset and overrides; task routing routes the recipe's tasks."""
        return trained_config(self.model.preset, self.model.overrides, [t.name for t in self.tasks])


@dataclass(config=STRICT)
class EvalSuite:
    """Evaluation tasks on their own (``uniperceiver evaluate --suite FILE``): a recipe's ``evaluation.tasks``, with
    the folder their ``data`` paths are relative to (relative to the current directory, as a recipe's)."""

    tasks: list[EvalTaskSpec]
    data_root: LocalPath = "."

    @field_validator("tasks")
    @classmethod
    def _named_once(cls, tasks: list[EvalTaskSpec]) -> list[EvalTaskSpec]:
        names = [task.name for task in tasks]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if not tasks:
            raise ValueError("must hold at least one evaluation task")
        if repeated:
            raise ValueError(f"repeated task name(s) {', '.join(repeated)}")
        return tasks


def _location(error: dict[str, Any]) -> str:
    return shorten(".".join(str(part) for part in error["loc"] if not str(part).startswith("function-")) or "<root>")


def _message(error: dict[str, Any]) -> str:
    if error["type"] == "unexpected_keyword_argument":
        return "unknown key"
    if error["type"] == "value_error":  # ours (ranges, names, cross-field rules): without pydantic's prefix
        return str(error["ctx"]["error"])
    return error["msg"]


def read_yaml(text: str, source: str) -> Any:
    """Parsed YAML without anchors, aliases or repeated keys; any problem is a one-line :class:`RecipeError`
    starting with ``source``."""
    return _read_yaml(text, source, RecipeError)


def parse_value(text: str, source: str = "override") -> Any:
    """A command-line override value, read as YAML (``[1, 2]`` -> list, ``x`` -> str); ``3e-4``, which YAML 1.1
    leaves a string, becomes a float."""
    value = read_yaml(text, source)
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
            raise RecipeError(f"override {shown(item)} is not of the form key.path=value")
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
                node[key] = parse_value(value, f"override {path}")
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return data


def validate(data: Any, source: str = "recipe") -> Recipe:
    """A typed recipe from plain data, whose model config builds, whose texts and clips fit that model and
    whose task names are unique; the first problem is reported as one line with its key path."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping, got {type(data).__name__}")
    try:
        recipe = TypeAdapter(Recipe).validate_python(data)
    except ValidationError as e:
        first = e.errors()[0]
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise RecipeError(f"{source}: {_location(first)}: {_message(first)}{more}") from None
    try:
        config = recipe.model_config()
    except (TypeError, ValueError, ArithmeticError) as e:  # ArithmeticError: heads 0 divides by zero
        raise RecipeError(f"{source}: model: {e}") from None
    for key, tasks in (("tasks", recipe.tasks), ("evaluation.tasks", recipe.evaluation.tasks)):
        names = [task.name for task in tasks]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise RecipeError(f"{source}: {key}: repeated task name(s) {', '.join(repeated)}")
        for i, task in enumerate(tasks):
            # The model's tables bound a task: text positions (captions, passages, generated captions), frames.
            limits = [("max_text_len", task.max_text_len, "max_text_len", config.max_text_len)]
            if isinstance(task, EvalTaskSpec) and TASKS[task.type].family == "caption":
                limits.append(("max_len", task.max_len, "max_text_len", config.max_text_len))
            if TASKS[task.type].modality == "video":
                limits.append(("num_frames", task.num_frames, "max_frames", config.max_frames))
            for name, value, model_key, limit in limits:
                if value > limit:
                    raise RecipeError(f"{source}: {key}.{i}.{name}: must be <= the model's {model_key} {limit} "
                                      f"(got {value})")
    return recipe


def _read(path: Path, what: str) -> Any:
    """A recipe or suite file's YAML, read within :data:`MAX_RECIPE_BYTES`; any problem is one line."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        raw = read_small(path, what, MAX_RECIPE_BYTES)  # no more, whatever the file holds
    except OSError as e:
        raise RecipeError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError:
        raise RecipeError(f"{path}: is over {MAX_RECIPE_BYTES} bytes (1 MiB); a {what} is a few kilobytes") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: is not a text file (byte {e.object[e.start]:#04x} at offset {e.start} is not "
                          "UTF-8)") from None
    data = read_yaml(text, str(path))
    if data is None:
        raise RecipeError(f"{path}: is empty; a {what} is a YAML mapping")
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    data = _read(path, "recipe")
    if overrides:
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
        data = apply_overrides(data, overrides)
    return validate(data, str(path))


def load_suite(path: str | Path) -> EvalSuite:
    """The evaluation tasks of a recipe file (one with a ``stage``), or of a suite file: ``data_root`` and ``tasks``,
    each task as in a recipe's ``evaluation.tasks``."""
    path = Path(path)
    data = _read(path, "suite")
    if isinstance(data, dict) and "stage" in data:
        recipe = validate(data, str(path))
        if not recipe.evaluation.tasks:
            raise RecipeError(f"{path}: the recipe has no evaluation tasks")
        return EvalSuite(tasks=recipe.evaluation.tasks, data_root=recipe.data_root)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a suite is a YAML mapping (data_root, tasks), got {type(data).__name__}")
    try:
        return TypeAdapter(EvalSuite).validate_python(data)
    except ValidationError as e:
        first = e.errors()[0]
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise RecipeError(f"{path}: {_location(first)}: {_message(first)}{more}") from None
