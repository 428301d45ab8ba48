"""Typed model configuration and the named presets.

Every field has the reference's default (see docs/architecture.md). ``create_model(preset, **overrides)``
accepts any field as an override; nested ``moe`` / ``prompt`` accept a dataclass or a dict of their fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from uniperceiver_cli.text_files import shorten, shown

SOT_ID = 49406
EOT_ID = 49407
MASK_ID = 49408
GEN_ID = 49409
SPE_ID = 49410
VOCAB_SIZE = 49411

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIDEO_MEAN = (0.5, 0.5, 0.5)
VIDEO_STD = (0.5, 0.5, 0.5)


# The largest value of every count and size: generous for any real model (LARGE is 1024 wide with 24 layers and
# an MLP of 4096), small enough that a typo (10**400, a width of 10**7) is refused before anything is built.
LIMITS = {
    "width": 65536, "layers": 1024, "heads": 256, "mlp_dim": 65536, "vocab_size": 10**7, "max_text_len": 65536,
    "image_size": 8192, "patch_size": 8192, "max_frames": 4096,
    "num_experts": 4096, "top_k": 4096, "attribute_length": 1024, "tasks": 4096,
    "deep_prompt_length": 4096, "classifier_classes": 10**7,
}
MAX_PATCHES = 65536  # patches per frame: a 4096-pixel image in 16-pixel patches
def _refuse_unknown(given: dict[str, Any], kind: type, label: str) -> None:
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(kind)}, key=str)
    if unknown:
        raise ValueError(f"unknown {label} field(s): {shorten(', '.join(map(str, unknown)))}")


def _check_int(owner: object, name: str, low: int) -> None:
    """``name`` is an integer in [low, LIMITS[name]]."""
    value = getattr(owner, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {kind}, got {shown(value)}")
    if value > LIMITS[name]:
        raise ValueError(f"{name} must be at most {LIMITS[name]}, got {shown(value)}")


def _check_float(owner: object, name: str, low: float, high: float = math.inf, *, open_low: bool = False,
                 open_high: bool = False) -> None:
    """``name`` is a finite number in the interval [low, high] ("(" / ")" where open)."""
    value = getattr(owner, name)
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < low or (open_low and value == low) or value > high or (open_high and value == high):
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high or high == math.inf else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {shown(value)}")


ROUTINGS = ("attribute", "modality", "task", "token", "context")
# Sizes that ModelConfig.num_parameters needs from modules that import torch (its test builds every kind of model):
_TEMPERATURES = 6  # model/heads.py TEMPERATURES
_ATTRIBUTE_ROWS = 7  # model/moe.py ATTRIBUTES
_MODALITIES = 2  # model/moe.py MODALITIES


@dataclass
class MoEConfig:
    """Conditional mixture of experts (Uni-Perceiver-MoE) and the routing levels its paper compares."""

    num_experts: int = 8
    top_k: int = 2
    # Which layers hold experts: "odd" = index % 2 == 0 (the reference's name), "four" = index % 4 == 0, "all".
    location: str = "odd"
    # What the gates see (docs/architecture.md): "attribute" (the segment's 8-bit attribute row, the reference's),
    # "modality" (the segment's modality), "task" (the call's task, one of `tasks`), "token" (each token's hidden
    # state) or "context" (each sample's mean hidden state). The first three are data-independent.
    routing: str = "attribute"
    attribute_length: int = 8
    # Noise added to the gate logits in training: "vmoe" (Gaussian, std noise_std / num_experts), "gumbel", "none".
    noise_policy: str = "vmoe"
    noise_std: float = 1.0
    # Token and context routing: expert capacity ceil(capacity_factor * top_k * tokens / num_experts) per call,
    # choices beyond it dropped; None is dropless (every expert can take every token).
    capacity_factor: float | None = None
    # Task routing: the task names it routes, one learned logits row each; training fills them from the recipe.
    tasks: list[str] = field(default_factory=list)
    # Experts merged per attribute row, modality or task (model/folding.py), for inference only; the fields above
    # then describe what was folded and are not used.
    folded: bool = False

    def __post_init__(self) -> None:
        _check_int(self, "num_experts", 1)
        _check_int(self, "attribute_length", 1)
        _check_int(self, "top_k", 1)
        if self.top_k > self.num_experts:
            raise ValueError(f"moe.top_k {self.top_k} is larger than moe.num_experts {self.num_experts}")
        if self.location not in ("odd", "four", "all"):
            raise ValueError(f"moe.location must be 'odd', 'four' or 'all', got {shown(self.location)}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"moe.routing must be one of {', '.join(map(repr, ROUTINGS))}, got {shown(self.routing)}")
        if self.noise_policy not in ("vmoe", "gumbel", "none"):
            raise ValueError(f"moe.noise_policy must be 'vmoe', 'gumbel' or 'none', got {shown(self.noise_policy)}")
        _check_float(self, "noise_std", 0.0, 1e3)
        if self.capacity_factor is not None:  # beyond num_experts / top_k every expert can take every token
            _check_float(self, "capacity_factor", 0.0, LIMITS["num_experts"], open_low=True)
        tasks = self.tasks
        if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) and t for t in tasks) \
                or len(set(tasks)) != len(tasks):
            raise ValueError(f"moe.tasks must be a list of distinct task names, got {shown(tasks)}")
        if len(tasks) > LIMITS["tasks"]:
            raise ValueError(f"moe.tasks must name at most {LIMITS['tasks']} tasks, got {len(tasks)}")
        self.tasks = list(tasks)
        if tasks and self.routing != "task":
            raise ValueError(f"moe.tasks names the tasks of routing 'task', and moe.routing is {self.routing!r}")
        if not isinstance(self.folded, bool):
            raise ValueError(f"moe.folded must be true or false, got {shown(self.folded)}")
        if self.folded and self.routing in ("token", "context"):
            raise ValueError(f"moe.routing {self.routing!r} routes by token features: its experts cannot be folded")

    @property
    def data_dependent(self) -> bool:
        """Whether the gates read the hidden states (token and context routing), so decisions change with the data."""
        return self.routing in ("token", "context")

    def routing_tasks(self, names: list[str]) -> MoEConfig:
        """The config task routing trains with on tasks ``names``: ``tasks`` filled with them when empty.

        Raises:
            ValueError: ``tasks`` is given and lacks one of ``names``.
        """
        if self.routing != "task":
            return self
        missing = [n for n in names if n not in self.tasks]
        if self.tasks and missing:
            raise ValueError(f"moe.tasks ({', '.join(self.tasks)}) lacks the training task(s) {', '.join(missing)}: "
                             "task routing has experts only for the tasks it lists")
        return dataclasses.replace(self, tasks=list(self.tasks or names))

    def is_moe_layer(self, index: int) -> bool:
        return index % {"odd": 2, "four": 4, "all": 1}[self.location] == 0


@dataclass
class PromptConfig:
    """Prompt-tuning parameters; all off by default."""

    deep_prompt_length: int = 0  # learned key/value prefixes per layer (the reference uses 10)
    separate_target_prompts: bool = False  # targets get their own prefixes (retrieval configs)
    spe_bias: bool = False  # learned vector added to every <|spe|> embedding
    classifier_classes: int = 0  # > 0 adds the zero-initialised linear classifier prompt head

    def __post_init__(self) -> None:
        _check_int(self, "deep_prompt_length", 0)
        _check_int(self, "classifier_classes", 0)


@dataclass
class ModelConfig:
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    vocab_size: int = VOCAB_SIZE
    max_text_len: int = 512
    image_size: int = 224
    patch_size: int = 16
    max_frames: int = 8
    # Both sin-cos coordinates are multiplied by this (160/224 for every post-stage-1 model).
    pos_scale: float = 160 / 224
    layer_scale_init: float = 1e-3
    drop_path: float = 0.1
    temperature_init: float = 0.07
    moe: MoEConfig | None = None
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if isinstance(self.prompt, dict):
            self.prompt = PromptConfig(**self.prompt)
        if not isinstance(self.moe, (MoEConfig, type(None))) or not isinstance(self.prompt, PromptConfig):
            raise ValueError(f"moe must be a mapping or null and prompt a mapping, got {shown(self.moe)} and "
                             f"{shown(self.prompt)}")
        for name in ("width", "layers", "heads", "mlp_dim", "vocab_size", "max_text_len", "image_size", "patch_size",
                     "max_frames"):
            _check_int(self, name, 1)
        _check_float(self, "pos_scale", 0.0, 1e3, open_low=True)
        _check_float(self, "layer_scale_init", 0.0, 1e3)
        _check_float(self, "drop_path", 0.0, 1.0, open_high=True)
        _check_float(self, "temperature_init", 0.0, open_low=True)
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.width % 4:
            raise ValueError(f"width {self.width} must be divisible by 4 for the 2-D sin-cos table")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.grid_size**2 > MAX_PATCHES:  # the sin-cos table and every attention call grow with it
            raise ValueError(f"image_size {self.image_size} / patch_size {self.patch_size} gives {self.grid_size**2} "
                             f"patches per frame; at most {MAX_PATCHES}")

    @property
    def folded(self) -> bool:
        """Whether the model's experts are folded into per-row weights (an inference-only model)."""
        return self.moe is not None and self.moe.folded

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def logit_scale_init(self) -> float:
        return math.log(1 / self.temperature_init)

    def num_parameters(self) -> int:
        """The parameter elements of the model this config builds, counted from the shapes alone (no allocation):
        what ``UniPerceiver(config).num_parameters()`` gives."""
        d, h, moe, prompt = self.width, self.mlp_dim, self.moe, self.prompt
        text = (self.vocab_size + self.max_text_len + 1 + prompt.spe_bias) * d  # words, positions, type, <|spe|>
        visual = 3 * self.patch_size**2 * d + d + self.max_frames * d  # patch conv, temporal table
        head = 2 * d + d * d + d + _TEMPERATURES  # ln_post, proj, one temperature per task family
        if prompt.classifier_classes:
            head += (d + 1) * prompt.classifier_classes + 1  # fc_prompt, similarity_weight
        attention = (d * 3 * d + 3 * d) + (d * d + d)  # qkv, out
        mlp = (d * h + h) + (h * d + d)  # fc1, fc2
        prompts = prompt.deep_prompt_length * d * (2 if prompt.separate_target_prompts else 1)
        blocks = self.layers * (4 * d + 2 * d + attention + mlp + prompts)  # 2 norms, 2 gammas
        if moe is not None:  # each MoE layer: more copies of the four linears, and a gate for attention and MLP
            if moe.folded:  # one merged linear per attribute row, modality or task; the gate has no parameters
                experts, gate = {"modality": _MODALITIES, "task": len(moe.tasks)}.get(moe.routing, _ATTRIBUTE_ROWS), 0
            else:
                experts = moe.num_experts
                gate = {"attribute": moe.attribute_length * d + d + 2 * d + d * experts,  # tag_proj, tag_norm, router
                        "modality": _MODALITIES * experts, "task": len(moe.tasks) * experts,
                        }.get(moe.routing, d * experts)  # token and context routing: a router
            routed = sum(moe.is_moe_layer(i) for i in range(self.layers))
            blocks += routed * ((experts - 1) * (attention + mlp) + 2 * gate)
        return text + visual + 2 * d + blocks + head  # 2 * d: the shared embedding norm

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        _refuse_unknown(data, cls, "model config")
        return cls(**data)


_MOE_BASE = {"num_experts": 8, "top_k": 2, "location": "odd"}

PRESETS: dict[str, dict[str, Any]] = {
    # The reference's parity-fixture size: 64 wide, 3 layers, 2 heads of 32.
    "tiny": {"width": 64, "layers": 3, "heads": 2, "mlp_dim": 256, "drop_path": 0.0},
    "tiny-moe": {"width": 64, "layers": 3, "heads": 2, "mlp_dim": 256, "drop_path": 0.0,
                 "moe": {"num_experts": 4, "top_k": 2, "location": "odd"}},
    "small": {"width": 384, "layers": 12, "heads": 6, "mlp_dim": 1536},
    "small-moe": {"width": 384, "layers": 12, "heads": 6, "mlp_dim": 1536, "moe": _MOE_BASE},
    "base": {"width": 768, "layers": 12, "heads": 12, "mlp_dim": 3072},
    "large": {"width": 1024, "layers": 24, "heads": 16, "mlp_dim": 4096, "drop_path": 0.2},
    "base-moe": {"width": 768, "layers": 12, "heads": 12, "mlp_dim": 3072, "moe": _MOE_BASE},
    "large-moe": {"width": 1024, "layers": 24, "heads": 16, "mlp_dim": 4096, "drop_path": 0.2, "moe": _MOE_BASE},
}


def _merge_nested(base: Any, override: Any, kind: type) -> Any:
    """An override of a nested config: a dataclass replaces, a dict updates the preset's fields."""
    if override is None or isinstance(override, kind):
        return override
    if not isinstance(override, dict):
        raise TypeError(f"expected {kind.__name__} or dict, got {type(override).__name__}")
    _refuse_unknown(override, kind, kind.__name__)
    start = dataclasses.asdict(base) if base is not None else {}
    return kind(**{**start, **override})


def get_config(preset: str | ModelConfig = "base", **overrides: Any) -> ModelConfig:
    """The config of a named preset (or a given config) with field overrides applied."""
    if isinstance(preset, ModelConfig):
        config = dataclasses.replace(preset)
    else:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {shown(preset)}; choose one of: {', '.join(PRESETS)}")
        config = ModelConfig(**PRESETS[preset])
    _refuse_unknown(overrides, ModelConfig, "model config")
    for name, kind in (("moe", MoEConfig), ("prompt", PromptConfig)):
        if name in overrides:
            overrides[name] = _merge_nested(getattr(config, name), overrides[name], kind)
    return dataclasses.replace(config, **overrides)


def trained_config(preset: str, overrides: dict[str, Any], task_names: list[str]) -> ModelConfig:
    """The model a recipe trains: its preset and overrides; task routing routes the recipe's tasks."""
    config = get_config(preset, **overrides)
    if config.moe is not None:
        config = dataclasses.replace(config, moe=config.moe.routing_tasks(task_names))
    return config
