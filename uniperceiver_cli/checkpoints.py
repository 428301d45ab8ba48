"""Checkpoints: our bundle (model.safetensors + config.json) and import of the official formats.

Official files come as "torch" ``{'model': state_dict}`` or DeepSpeed "ds" ``{'module': state_dict}``,
dense or MoE. Their keys are mapped onto ours (docs/checkpoints.md lists the map). Nothing pickled
beyond tensors and plain containers is executed: every ``torch.load`` uses ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from uniperceiver_cli.model.config import (
    EOT_ID,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    SPE_ID,
    VIDEO_MEAN,
    VIDEO_STD,
    ModelConfig,
    get_config,
)
from uniperceiver_cli.model.heads import TEMPERATURES
from uniperceiver_cli.model.uniperceiver import UniPerceiver

BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_CONFIG = "config.json"
BUNDLE_FORMAT = "uniperceiver-bundle"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message is one line."""


class CheckpointWarning(UserWarning):
    """A checkpoint that loads but is suspect (non-finite weights); the message is one line."""


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint (a, b) vs model (c, d)"
    dropped: list[str] = field(default_factory=list)  # official keys the model does not use, by design

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 4) -> str:
        parts = []
        for label, names in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("wrong shape", self.mismatched)):
            if names:
                shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
                parts.append(f"{len(names)} {label} key(s): {shown}")
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------- bundles
def save_bundle(model: UniPerceiver, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (model config, tokenizer, preprocessing, and what the
    weights were trained over: ``model.class_names`` and ``model.caption_vocabulary``).

    Each file is written under a temporary name and renamed, so an interrupted save never leaves a
    half-written bundle behind an older one.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = directory / (BUNDLE_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": BUNDLE_FORMAT})
    os.replace(tmp, directory / BUNDLE_WEIGHTS)
    vocabulary = model.caption_vocabulary
    meta = {
        "format": BUNDLE_FORMAT,
        "version": 1,
        "model": model.config.to_dict(),
        "tokenizer": {"type": "clip-bpe", "vocab_size": model.config.vocab_size, "eot_id": EOT_ID,
                      "spe_id": SPE_ID},
        "preprocessing": {"image_size": model.config.image_size, "image_mean": IMAGENET_MEAN,
                          "image_std": IMAGENET_STD, "video_mean": VIDEO_MEAN, "video_std": VIDEO_STD},
        "targets": {"class_names": model.class_names,
                    "caption_vocabulary": None if vocabulary is None else vocabulary.tolist()},
    }
    tmp = directory / (BUNDLE_CONFIG + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, directory / BUNDLE_CONFIG)
    return directory


@dataclass
class Targets:
    """What a bundle's weights were trained over (``config.json`` "targets"); None where not recorded."""

    class_names: list[str] | None = None  # the class of each classifier-prompt (fc_prompt) row
    caption_vocabulary: torch.Tensor | None = None  # the token ids caption training scored against

    def apply(self, model: UniPerceiver) -> None:
        """Set them on a model that holds these weights. Class names describe fc_prompt rows, so a model whose
        classifier has another size (a non-strict load left it out) gets none."""
        fits = self.class_names is not None and len(self.class_names) == model.config.prompt.classifier_classes
        model.class_names = list(self.class_names) if fits else None
        model.caption_vocabulary = self.caption_vocabulary


def _read_targets(meta: dict, config: ModelConfig, path: Path) -> Targets:
    recorded = meta.get("targets") or {}  # bundles written before targets were recorded have none
    if not isinstance(recorded, dict):
        raise CheckpointError(f"cannot read {path}: targets must be a mapping")
    names, vocabulary = recorded.get("class_names"), recorded.get("caption_vocabulary")
    classes = config.prompt.classifier_classes
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)
                              or len(names) != classes):
        raise CheckpointError(f"cannot read {path}: targets.class_names must list the {classes} class names of "
                              f"the classifier prompt's rows")
    if vocabulary is not None and (
            not isinstance(vocabulary, list) or not vocabulary
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < config.vocab_size
                       for i in vocabulary)):
        raise CheckpointError(f"cannot read {path}: targets.caption_vocabulary must be a list of token ids "
                              f"in [0, {config.vocab_size})")
    return Targets(names, None if vocabulary is None else torch.tensor(vocabulary, dtype=torch.long))


def _read_bundle(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Targets]:
    config_path = directory / BUNDLE_CONFIG
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
        config = ModelConfig.from_dict(meta["model"])
    except FileNotFoundError as e:
        raise CheckpointError(f"{directory} is not a model bundle: {BUNDLE_CONFIG} is missing") from e
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"cannot read {config_path}: {e}") from e
    targets = _read_targets(meta, config, config_path)
    return config, _read_safetensors(directory / BUNDLE_WEIGHTS), targets


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or corrupt ({e})") from e


# ---------------------------------------------------------------------------------------- official
# DeepSpeed-era key fragments -> the reference's "torch" names (tools/convert_checkpoint.py, convertmoe.ipynb).
_DS_RENAMES = (
    ("encoder.", "fused_encoder."),
    ("attention.self.qkv_proj", "self_attn.qkv_proj"),
    ("attention.output.dense", "self_attn.dense"),
    ("attention_output.residual_scale", "gamma_1"),
    ("ffn.dense.", "linear1."),
    ("ffn.dense2.", "linear2."),
    ("ffn_output.residual_scale", "gamma_2"),
    ("LayerNormModules.0.", "norm1."),
    ("LayerNormModules.1.", "norm2."),
    ("predictor.", "loss_prepare."),
    ("deepspeed_moe.gate", "gate"),
    ("deepspeed_moe.experts", "experts"),
)

_LAYER = r"^fused_encoder\.layers\.(\d+)\."
# The reference's "torch" names -> ours. Expert keys carry the expert index as a second group.
_RENAMES = (
    (_LAYER + r"gamma_([12])$", r"blocks.\1.gamma\2"),
    (_LAYER + r"norm([12])\.(weight|bias)$", r"blocks.\1.norm\2.\3"),
    (_LAYER + r"self_attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (_LAYER + r"self_attn\.(?:out_proj|dense)\.(weight|bias)$", r"blocks.\1.attn.out.\2"),
    (_LAYER + r"self_attn\.qkv_proj\.(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (_LAYER + r"linear([12])\.(weight|bias)$", r"blocks.\1.mlp.fc\2.\3"),
    (_LAYER + r"self_attn\.qkv_proj\.gate\.", r"blocks.\1.attn.gate."),
    (_LAYER + r"linear1\.gate\.", r"blocks.\1.mlp.gate."),
    (_LAYER + r"deep_prompt_embedding\.embedding\.weight$", r"blocks.\1.prompt"),
    (_LAYER + r"deep_prompt_embedding\.target_embedding\.weight$", r"blocks.\1.target_prompt"),
    (r"^token_embed\.embeddings\.weight$", "text_embed.word.weight"),
    (r"^token_embed\.embeddings_pos\.position_embeddings\.weight$", "text_embed.position.weight"),
    (r"^token_embed\.embeddings_token_type\.weight$", "text_embed.text_type"),
    (r"^token_embed\.embeddings_norm\.(weight|bias)$", r"embed_norm.\1"),
    (r"^video_embed\.embeddings\.(weight|bias)$", r"visual_embed.patch.\1"),
    (r"^video_embed\.embeddings_st_pos\.temporal_pos_embed\.weight$", "visual_embed.temporal.weight"),
    (r"^loss_prepare\.(ln_post|proj)\.(weight|bias)$", r"head.\1.\2"),
    (r"^loss_prepare\.logit_scale_(\w+)$", r"head.logit_scale.\1"),
    (r"^s_token_bias$", "text_embed.spe_bias"),
    (r"^(?:loss_prepare\.)?fc_prompt\.(weight|bias)$", r"head.fc_prompt.\1"),
    (r"^(?:loss_prepare\.)?similarity_weight$", "head.similarity_weight"),
)
_GATE_PARTS = (("tag_transform.0.", "tag_proj."), ("tag_transform.1.", "tag_norm."), ("wg.", "router."))
_EXPERT = re.compile(_LAYER + r"(self_attn\.qkv_proj|self_attn\.dense|linear1|linear2)\.experts\."
                     r"deepspeed_experts\.(\d+)\.(weight|bias)$")
_EXPERT_TARGET = {"self_attn.qkv_proj": "attn.qkv", "self_attn.dense": "attn.out",
                  "linear1": "mlp.fc1", "linear2": "mlp.fc2"}
# Present in official files, unused by the reference at inference; we do not keep them.
_DROPPED = (
    re.compile(_LAYER + r"(self_attn\.dense|linear2)\.gate\."),  # these reuse the qkv / linear1 decision
    re.compile(r"^video_embed\.embeddings_norm\."),  # the same tensor as token_embed.embeddings_norm
    re.compile(r"^video_embed\.embeddings_st_pos\.spatial_pos_embed\.weight$"),  # frozen sin-cos, rebuilt
    re.compile(r"^video_embed\.embeddings_type\.weight$"),  # folded into the patch bias, or unused
    re.compile(r"^visual_embed"),  # dropped by the reference's converter
)


def _official_name(key: str) -> str | None:
    """Our name for a key in the reference's "torch" naming, or None when it is not one we know."""
    for pattern, target in _RENAMES:
        if re.match(pattern, key):
            name = re.sub(pattern, target, key)
            if ".gate." in name:
                for old, new in _GATE_PARTS:
                    name = name.replace("gate." + old, "gate." + new)
            return name
    return None


def torch_load(path: str | Path, failure: str, allowed: tuple[type | Any, ...] = (), map_location: Any = "cpu",
               ) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors, plain containers and the ``allowed`` globals. Anything
    else in the file is refused before it runs; a file that cannot be read raises one line,
    ``{failure} {path}: truncated, corrupt or unsafe (why)``."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise CheckpointError(f"{failure} {path}: truncated, corrupt or unsafe ({_load_failure(e)})") from None


def _load_failure(error: Exception) -> str:
    """The informative line of torch's message: for a refused global, the unpickler's own line (torch puts a
    paragraph of advice with terminal colours before it)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    mark = "WeightsUnpickler error:"
    refused = [line.split(mark, 1)[1].strip() for line in lines if mark in line]
    found = re.match(r"Unsupported global: GLOBAL (\S+)", refused[0]) if refused else None
    if found:
        return f"it would call {found.group(1)}, which a checkpoint may not"
    return (refused or lines or [type(error).__name__])[0]


def read_official(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Load an official file; returns its state dict and its format, "torch" or "ds"."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    obj = torch_load(path, "cannot read checkpoint", (argparse.Namespace,))
    if isinstance(obj, dict) and isinstance(obj.get("module"), dict):
        return obj["module"], "ds"
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"], "torch"
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, "torch"
    raise CheckpointError(f"{path} holds no state dict under 'model' or 'module'")


def convert_official(state: dict[str, torch.Tensor], fmt: str, fold_video_type: bool | None = None,
                     ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Map an official state dict onto our names.

    Args:
        state: the state dict from :func:`read_official`.
        fmt: "torch" or "ds". DeepSpeed keys are first renamed the way the reference's converters do.
        fold_video_type: add ``video_embed.embeddings_type`` to the patch bias (exact: both come before the
            LayerNorm). Default: fold for "ds" files, whose models added it; ignore for "torch" files,
            whose converter already folded it. A MoE "-withvtype" torch file needs ``True``.

    Returns:
        Our state dict, the official keys we did not recognise, and those dropped by design.
    """
    if fmt not in ("torch", "ds"):
        raise ValueError(f"official format must be 'torch' or 'ds', got {fmt!r}")
    if fold_video_type is None:
        fold_video_type = fmt == "ds"
    renamed = {}
    for key, value in state.items():
        if fmt == "ds":
            for old, new in _DS_RENAMES:
                key = key.replace(old, new)
            if key.endswith(("gamma_1", "gamma_2")):
                value = value.reshape(-1)
        renamed[key] = value.float() if value.is_floating_point() else value
    ours: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    unknown, dropped = [], []
    for key, value in renamed.items():
        expert = _EXPERT.match(key)
        if expert:
            layer, part, index, kind = expert.groups()
            experts.setdefault(f"blocks.{layer}.{_EXPERT_TARGET[part]}.{kind}", {})[int(index)] = value
            continue
        if any(p.match(key) for p in _DROPPED):
            dropped.append(key)
            continue
        name = _official_name(key)
        if name is None:
            unknown.append(key)
            continue
        if name.startswith("head.logit_scale.") and name.rsplit(".", 1)[1] not in TEMPERATURES:
            dropped.append(key)  # temperatures of task families the reference never trained
            continue
        if name == "text_embed.text_type":
            value = value[0]  # text always uses type row 0
        elif name == "text_embed.spe_bias":
            value = value.reshape(-1)
        ours[name] = value
    for name, by_index in experts.items():
        if sorted(by_index) != list(range(len(by_index))):
            unknown.append(f"{name} (expert indices {sorted(by_index)} are not 0..{len(by_index) - 1})")
            continue
        ours[name] = torch.stack([by_index[i] for i in range(len(by_index))])
    vtype = renamed.get("video_embed.embeddings_type.weight")
    if fold_video_type and vtype is not None and "visual_embed.patch.bias" in ours:
        ours["visual_embed.patch.bias"] = ours["visual_embed.patch.bias"] + vtype[0]
    return ours, unknown, dropped


def infer_config(state: dict[str, torch.Tensor], **overrides: object) -> ModelConfig:
    """A model config matching converted official weights: a preset of the same shape, else heads of 64."""
    width = state["text_embed.word.weight"].shape[1]
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    mlp = state["blocks.0.mlp.fc1.weight"].shape[-2]
    expert_keys = [k for k in state if k.endswith("mlp.fc1.weight") and state[k].dim() == 3]
    moe = None
    if expert_keys:
        moe_layers = sorted(int(k.split(".")[1]) for k in expert_keys)
        location = {tuple(range(0, layers, 2)): "odd", tuple(range(0, layers, 4)): "four",
                    tuple(range(layers)): "all"}.get(tuple(moe_layers))
        if location is None:
            raise CheckpointError(f"experts at layers {moe_layers} match no supported moe.location")
        moe = {"num_experts": state[expert_keys[0]].shape[0], "location": location}
    preset = next((name for name, p in PRESETS.items()
                   if (p["width"], p["layers"], p["mlp_dim"]) == (width, layers, mlp)
                   and (p.get("moe") is None) == (moe is None)), None)
    prompt = {}
    if "blocks.0.prompt" in state:
        prompt["deep_prompt_length"] = state["blocks.0.prompt"].shape[0]
        prompt["separate_target_prompts"] = "blocks.0.target_prompt" in state
    if "text_embed.spe_bias" in state:
        prompt["spe_bias"] = True
    if "head.fc_prompt.weight" in state:
        prompt["classifier_classes"] = state["head.fc_prompt.weight"].shape[0]
    found: dict[str, object] = {"width": width, "layers": layers, "mlp_dim": mlp,
                                "max_text_len": state["text_embed.position.weight"].shape[0],
                                "vocab_size": state["text_embed.word.weight"].shape[0],
                                "max_frames": state["visual_embed.temporal.weight"].shape[0],
                                "patch_size": state["visual_embed.patch.weight"].shape[-1]}
    if preset is None:
        found["heads"] = max(1, width // 64)
    if moe is not None:
        found["moe"] = moe
    if prompt:
        found["prompt"] = prompt
    return get_config(preset or "base", **{**found, **overrides})


# ---------------------------------------------------------------------------------------- loading
def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> LoadReport:
    """Missing, unexpected and mis-shaped keys of ``state`` against ``model``."""
    expected = model.state_dict()
    report = LoadReport()
    report.missing = sorted(set(expected) - set(state))
    report.unexpected = sorted(set(state) - set(expected))
    report.mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    return report


def _apply(model: torch.nn.Module, state: dict[str, torch.Tensor], report: LoadReport, path: Path,
           strict: bool) -> LoadReport:
    if strict and not report.ok:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {report.summary()}")
    bad = {m.split(":")[0] for m in report.mismatched}
    usable = {k: v for k, v in state.items() if k not in bad and k not in report.unexpected}
    _warn_non_finite(usable, path)
    model.load_state_dict(usable, strict=False)
    return report


def _warn_non_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """NaN or infinite weights load without error but make every output meaningless (chance accuracy)."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        warnings.warn(f"checkpoint {path}: {len(bad)} of {len(state)} tensors hold NaN or infinite values "
                      f"({shown}); the model's outputs will be meaningless", CheckpointWarning, stacklevel=2)


def load_checkpoint(model: UniPerceiver, path: str | Path, *, strict: bool = True,
                    fold_video_type: bool | None = None) -> LoadReport:
    """Load a bundle directory, a ``.safetensors`` file or an official ``.pth`` file into ``model``.

    With ``strict`` (the default) any missing, unexpected or mis-shaped key raises a one-line
    :class:`CheckpointError` naming them; otherwise the fitting tensors are loaded and the report says
    what was left out. A bundle also sets what its weights were trained over (``model.class_names``,
    ``model.caption_vocabulary``); any other file records neither, so both become None.
    """
    path = Path(path)
    targets = Targets()
    if path.is_dir():
        _, state, targets = _read_bundle(path)
        report = _apply(model, state, check_state(model, state), path, strict)
    elif path.suffix == ".safetensors":
        state = _read_safetensors(path)
        report = _apply(model, state, check_state(model, state), path, strict)
    else:
        state, unknown, dropped = convert_official(*read_official(path), fold_video_type)
        report = _apply_official(model, state, unknown, dropped, path, strict)
    targets.apply(model)
    return report


def _apply_official(model: UniPerceiver, state: dict[str, torch.Tensor], unknown: list[str],
                    dropped: list[str], path: Path, strict: bool) -> LoadReport:
    report = check_state(model, state)
    report.unexpected = sorted(report.unexpected + unknown)
    report.dropped = dropped
    return _apply(model, state, report, path, strict)


def load_model(path: str | Path, *, preset: str | None = None, strict: bool = True,
               fold_video_type: bool | None = None, **overrides: object) -> UniPerceiver:
    """A model built from a checkpoint: a bundle carries its config; for an official file the config is
    inferred from the weights' shapes (or given by ``preset`` and field overrides)."""
    path = Path(path)
    if path.is_dir():
        config, state, targets = _read_bundle(path)
        if preset is not None or overrides:
            config = get_config(preset or config, **overrides)
        try:
            model = UniPerceiver(config)
        except (ValueError, TypeError, RuntimeError) as e:  # torch's RuntimeError for impossible sizes
            raise CheckpointError(f"the config of {path} does not build a model: {' '.join(str(e).split())}") from e
        _apply(model, state, check_state(model, state), path, strict)
        targets.apply(model)
        return model.eval()
    state, unknown, dropped = convert_official(*read_official(path), fold_video_type)
    try:
        config = get_config(preset, **overrides) if preset else infer_config(state, **overrides)
    except KeyError as e:
        raise CheckpointError(f"{path} lacks {e.args[0]}, needed to infer the model's shape") from e
    model = UniPerceiver(config)
    _apply_official(model, state, unknown, dropped, path, strict)
    return model.eval()
