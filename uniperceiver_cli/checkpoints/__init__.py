"""Checkpoints: our bundle (model.safetensors + config.json) and import of the official formats.

Official files come as "torch" ``{'model': state_dict}`` or DeepSpeed "ds" ``{'module': state_dict}``,
dense or MoE. Their keys are mapped onto ours (docs/checkpoints.md lists the map). Nothing pickled
beyond tensors and plain containers is executed: every ``torch.load`` uses ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from uniperceiver_cli.checkpoints.runs import (
    CLIENT_KEY,
    DEEPSPEED_DIR,
    DEEPSPEED_TAG,
    EXPERTS_DIR,
    STATE_FILE,
    expert_shard_file,
)
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


_multiarray = getattr(np, "_core", None) or np.core
# Checkpoints of older versions hold numpy's RNG state as an array: accept numpy's plain array rebuild
# (no code of the file's choosing runs; object arrays' items go through the same restricted unpickler).
STATE_GLOBALS = (_multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)))


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message is one line."""


class CheckpointWarning(UserWarning):
    """A checkpoint that loads but is suspect (non-finite weights), or what an interrupted export left beside a
    bundle and was put right; the message is one line."""


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
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def save_bundle(model: UniPerceiver, directory: str | Path, *, dtype: str | torch.dtype | None = None,
                provenance: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (model config, tokenizer, preprocessing, and what the
    weights were trained over: ``model.class_names`` and ``model.caption_vocabulary``).

    ``dtype`` ("fp32", "bf16", "fp16" or a torch dtype) casts the floating-point tensors (default: as they are);
    ``load_model`` reads any of them into an fp32 model. ``provenance`` (where the weights came from) is kept
    in ``config.json`` as it is. Each file is written under a temporary name and renamed, so an interrupted save
    never leaves a half-written bundle behind an older one.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cast = DTYPES[dtype] if isinstance(dtype, str) else dtype
    state = model.state_dict()
    tensors = {k: v.detach().to(cast if cast is not None and v.is_floating_point() else v.dtype).contiguous().cpu()
               for k, v in state.items()}
    if cast is not None and cast != torch.float32:
        overflow = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
                    and bool(torch.isfinite(state[k]).all())]
        if overflow:
            raise CheckpointError(f"{len(overflow)} tensor(s) overflow {cast} (e.g. {overflow[0]}); export in a "
                                  f"wider dtype")
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
    if provenance is not None:
        meta["provenance"] = provenance
    tmp = directory / (BUNDLE_CONFIG + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, directory / BUNDLE_CONFIG)
    return directory


def staging_folders(out: Path) -> tuple[Path, Path]:
    """The folders beside ``out`` where ``uniperceiver export`` writes its new bundle (``.NAME.export-PID@HOST``) and
    moves the bundle it replaces (``.NAME.replaced-PID@HOST``) until the new one is in place."""
    owner = f"{os.getpid()}@{socket.gethostname()}"
    return out.parent / f".{out.name}.export-{owner}", out.parent / f".{out.name}.replaced-{owner}"


def _exporter_gone(pid: str, host: str | None) -> bool:
    """Whether the export that named a staging folder has ended: it ran on this host (or recorded none, as earlier
    versions did) and no process has its PID. One of another host cannot be told, so it is never taken for ended."""
    if host not in (None, socket.gethostname()):
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # PermissionError: another user's process has that PID; no PID is that large
        return False
    return False


def recover_export(out: Path) -> None:
    """Put right what an export to ``out`` stopped midway (killed) left beside it, each with a one-line
    :class:`CheckpointWarning`: when ``out`` is missing, the bundle an ``export --force`` had moved aside is renamed
    back (it was stopped between its two renames); the other staging folders of ended exports are removed. Those of
    an export still running, or of another host, are left alone."""
    try:
        siblings = list(out.parent.iterdir()) if out.name else []
    except OSError:  # a folder that does not exist or cannot be listed holds nothing to put right
        return
    pattern = re.compile(re.escape(f".{out.name}.") + r"(export|replaced)-(\d+)(?:@(.+))?")
    left = [(folder, found) for folder in siblings if (found := pattern.fullmatch(folder.name))
            and folder.is_dir() and not folder.is_symlink() and _exporter_gone(found.group(2), found.group(3))]
    for folder, found in sorted(left, key=_mtime, reverse=True):  # newest first
        try:
            if found.group(1) == "replaced" and not out.exists():
                os.replace(folder, out)
                warnings.warn(f"{out} was missing: an export --force stopped while replacing it had moved it to "
                              f"{folder.name}; renamed it back", CheckpointWarning, stacklevel=3)
            else:
                shutil.rmtree(folder)
                warnings.warn(f"removed {folder}, left by an export that was stopped", CheckpointWarning, stacklevel=3)
        except FileNotFoundError:  # another process (every rank loading the same init) put it right first
            continue


def _mtime(item: tuple[Path, Any]) -> float:
    try:
        return item[0].stat().st_mtime
    except FileNotFoundError:
        return 0.0


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


MAX_SIDE_FILE = 8 << 20  # bytes: the most a config.json, config.yaml or DeepSpeed "latest" file is read up to


def _read_small_file(path: Path) -> bytes:
    """The bytes of a file that sits beside weights (a bundle's ``config.json``, a run's ``config.yaml``), read up to
    :data:`MAX_SIDE_FILE`: a larger one (or a link to an endless device) is refused with one line, unparsed."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SIDE_FILE + 1)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_SIDE_FILE:
        raise CheckpointError(f"{path} is larger than {MAX_SIDE_FILE >> 20} MB, too large for a config; not read")
    return data


def _read_bundle(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Targets, Any]:
    """A bundle's config, weights, targets and provenance record (None where it has none)."""
    config_path = directory / BUNDLE_CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"{directory} is not a model bundle: {BUNDLE_CONFIG} is missing")
    data = _read_small_file(config_path)
    try:
        meta = json.loads(data)
        config = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError, RecursionError) as e:  # ValueError: JSON and unicode errors too
        raise CheckpointError(f"cannot read {config_path}: {' '.join(str(e).split())}") from e
    targets = _read_targets(meta, config, config_path)
    return config, _read_safetensors(directory / BUNDLE_WEIGHTS), targets, meta.get("provenance")


# The model's state is floating point only (its buffers are not saved); the dtypes its weights may come in.
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file. Their dtypes are checked in the header before any data is read: one that
    is not floating point (such as F32 data relabelled I32, the same bytes) would load as meaningless weights."""
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                dtype = f.get_slice(name).get_dtype()
                if dtype not in _FLOAT_DTYPES:
                    raise CheckpointError(f"{path}: tensor {name} is {dtype}, not a floating-point dtype a weight "
                                          f"takes ({', '.join(_FLOAT_DTYPES)})")
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
    """Load an official file; returns its state dict and its format, "torch" or "ds".

    The container is told apart by its keys' naming: a file written by this toolkit (a single-engine
    ``state.pt`` or its DeepSpeed checkpoint, whose keys are already ours) is refused, never renamed."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    obj = _load_torch_file(path)
    kind, state, fmt = classify_container(obj, path)
    if kind != "official":
        raise CheckpointError(f"{path} is a {KIND_LABELS[kind]} written by this toolkit, not an official checkpoint "
                              f"(its keys are already ours)")
    return state, fmt


# ---------------------------------------------------------------------------------------- sources
# What ``load_model`` and ``uniperceiver export`` accept, told apart in two steps: where the weights sit (a
# folder's layout, a file's container) and, for a torch file, whose naming its keys follow.
KIND_LABELS = {"bundle": "bundle", "run": "run directory", "state": "single-engine training state",
               "deepspeed": "DeepSpeed checkpoint", "official": "official checkpoint"}
DEEPSPEED_MODEL = "mp_rank_00_model_states.pt"
_OUR_PREFIXES = ("blocks.", "text_embed.", "embed_norm.", "head.")
_REFERENCE_PREFIXES = ("fused_encoder.", "encoder.", "token_embed.", "video_embed.", "loss_prepare.", "predictor.")
_OPTIM_RANK = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def key_naming(keys: Any) -> str:
    """"ours", "reference" or "unknown": whose names a state dict's keys are."""
    keys = [k for k in keys if isinstance(k, str)]
    ours = any(k.startswith(_OUR_PREFIXES) for k in keys)
    reference = any(k.startswith(_REFERENCE_PREFIXES) for k in keys)
    return "ours" if ours and not reference else "reference" if reference and not ours else "unknown"


def _tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def classify_container(obj: Any, path: Path) -> tuple[str, dict[str, torch.Tensor], str | None]:
    """The kind of a loaded torch file ("state", "deepspeed" or "official"), its state dict and, for an
    official one, its format ("torch" or "ds").

    DeepSpeed's container (``{'module': ...}``) holds our own checkpoints as well as the reference's "ds" files:
    ours carry the loop's state under ``uniperceiver`` and our key names; only the reference's naming is
    renamed. A file that mixes the two, or follows neither, is refused."""
    if isinstance(obj, dict) and isinstance(obj.get("module"), dict):
        naming = key_naming(obj["module"])
        if CLIENT_KEY in obj or naming == "ours":
            if naming != "ours":
                raise CheckpointError(f"{path} carries this toolkit's training state but its module keys are not "
                                      f"this toolkit's names")
            return "deepspeed", obj["module"], None
        if naming == "reference":
            return "official", obj["module"], "ds"
        raise CheckpointError(f"{path} holds a DeepSpeed module whose keys are neither this toolkit's nor the "
                              f"reference's names")
    state = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if isinstance(state, dict) and state and (state is not obj or _tensor_dict(obj)):
        naming = key_naming(state)
        if naming == "ours":
            return "state", state, None
        if naming == "reference":
            return "official", state, "torch"
        raise CheckpointError(f"{path} holds a state dict whose keys are neither this toolkit's nor the reference's "
                              f"names")
    raise CheckpointError(f"{path} holds no state dict under 'model' or 'module'")


def deepspeed_records() -> tuple[type, ...]:
    """The plain DeepSpeed classes its ZeRO optimizer states pickle: a loss scaler, a ZeRO stage enum, a
    fragment address (imports deepspeed)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address


def _load_torch_file(path: Path) -> Any:
    """A torch file loaded with ``weights_only=True``. DeepSpeed's optimizer records (a loss scaler, a ZeRO
    stage enum, a fragment address) are accepted when the file names them, and nothing else."""
    allowed: tuple[Any, ...] = (argparse.Namespace, *STATE_GLOBALS)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path) if zipfile.is_zipfile(path) else []
    except Exception:  # noqa: BLE001 - a damaged file: torch_load below names the problem
        names = []
    if any(name.startswith("deepspeed.") for name in names):
        allowed += deepspeed_records()  # deepspeed is a dependency; imported only for files that need it
    return torch_load(path, "cannot read checkpoint", allowed)


@dataclass
class Source:
    """A checkpoint of any kind, located and read (:func:`find_source`).

    Attributes:
        kind: "bundle", "state", "deepspeed" or "official" (a run directory resolves to one of them).
        path: the folder or file holding the weights; ``weights`` the main weights file (hashed for provenance).
        run_dir: the run directory it belongs to, when known (its ``config.yaml`` gives the model config).
        given: the path as given, when it was a run directory.
    """

    kind: str
    path: Path
    weights: Path
    run_dir: Path | None = None
    given: Path | None = None
    step: int | None = None
    format: str | None = None  # official: "torch" or "ds"
    zero_stage: int | None = None
    processes: int | None = None
    expert_parallel: int | None = None  # a DeepSpeed checkpoint whose experts were sharded over this many ranks
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def describe(self) -> str:
        """One line: what kind of source it is and where, e.g. ``deepspeed checkpoint (ZeRO 2, 2 processes,
        step 4) runs/x/checkpoints/step-0000004``."""
        details = []
        if self.kind == "official":
            details.append(f'"{self.format}" format')
        if self.zero_stage is not None:
            details.append(f"ZeRO {self.zero_stage}")
        if self.processes is not None:
            details.append(f"{self.processes} process{'es' if self.processes != 1 else ''}")
        if self.expert_parallel is not None:
            details.append(f"experts over {self.expert_parallel} ranks, stacked")
        if self.step is not None:
            details.append(f"step {self.step}")
        label = {"deepspeed": "deepspeed checkpoint", "state": "single-engine checkpoint"}.get(
            self.kind, "final bundle" if self.given is not None else KIND_LABELS[self.kind])
        line = label + (f" ({', '.join(details)})" if details else "") + f" {self.path}"
        return f"run directory {self.given}: {line}" if self.given is not None else line


def _step_folders(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    found = [p for p in folder.glob("step-*") if p.is_dir() and p.name.split("-")[1].isdigit()] \
        if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _folder_kind(path: Path) -> str | None:
    if (path / BUNDLE_CONFIG).is_file() or (path / BUNDLE_WEIGHTS).is_file():
        return "bundle"
    if (path / STATE_FILE).is_file():
        return "state"
    if (path / DEEPSPEED_DIR).is_dir() or (path / DEEPSPEED_MODEL).is_file() or (path / "latest").is_file() \
            or (path / DEEPSPEED_TAG / DEEPSPEED_MODEL).is_file():
        return "deepspeed"
    if (path / "checkpoints").is_dir() or (path / "final").is_dir() or (path / "config.yaml").is_file():
        return "run"
    return None


def _run_of(path: Path) -> Path | None:
    """The run directory a checkpoint sits in: the folder above ``checkpoints/`` that holds ``config.yaml``."""
    path = path.resolve()  # "." has no name: a relative step folder must still find its run
    for parent in [path, *path.parents][:6]:
        if parent.name == "checkpoints" and (parent.parent / "config.yaml").is_file():
            return parent.parent
    return None


def _deepspeed_folder(path: Path) -> Path:
    """The folder holding ``mp_rank_00_model_states.pt``, from a step folder, its ``deepspeed/`` or the tag."""
    folder = path / DEEPSPEED_DIR if (path / DEEPSPEED_DIR).is_dir() else path
    if (folder / DEEPSPEED_MODEL).is_file():
        return folder
    latest = folder / "latest"
    tags = [_read_small_file(latest).decode("utf-8", errors="replace").strip()] if latest.is_file() else []
    for tag in [*tags, DEEPSPEED_TAG]:
        if tag not in ("", ".", "..") and "/" not in tag and (folder / tag / DEEPSPEED_MODEL).is_file():
            return folder / tag
    raise CheckpointError(f"{path} is not a complete DeepSpeed checkpoint: no {DEEPSPEED_MODEL} in it")


def _check_ranks(folder: Path, obj: dict[str, Any]) -> tuple[int | None, int]:
    """The ZeRO stage and process count of a DeepSpeed checkpoint; one line if a process's part is missing."""
    processes = obj.get("dp_world_size", 1)
    config = obj.get("ds_config") if isinstance(obj.get("ds_config"), dict) else {}
    zero = config.get("zero_optimization", {}).get("stage", 0) if isinstance(config.get("zero_optimization"),
                                                                             dict) else 0
    if not isinstance(processes, int) or processes < 1:
        raise CheckpointError(f"{folder / DEEPSPEED_MODEL} does not record its process count (dp_world_size)")
    if obj.get("mp_world_size", 1) != 1:
        raise CheckpointError(f"{folder}: model-parallel DeepSpeed checkpoints (mp_world_size "
                              f"{obj.get('mp_world_size')}) are not supported")
    ranks = {int(m.group(1)) for m in (_OPTIM_RANK.match(p.name) for p in folder.iterdir()) if m}
    zero = int(zero) if isinstance(zero, int) else 0
    if zero >= 1 or ranks:
        missing = sorted(set(range(processes)) - ranks)
        if missing:
            raise CheckpointError(f"{folder} is an incomplete DeepSpeed checkpoint: it was written by {processes} "
                                  f"process(es) but the optimizer part of rank(s) "
                                  f"{', '.join(map(str, missing))} is missing")
    return zero, processes


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_source(path: str | Path, *, kind: str | None = None, step: int | None = None,
                latest: bool = False) -> Source:
    """Locate and read a checkpoint of any kind; ``kind`` forces one ("bundle", "run", "state", "deepspeed",
    "official"); ``step`` / ``latest`` pick a checkpoint inside a run directory. Bad input raises one line.

    - a bundle folder (or its ``model.safetensors``);
    - a run directory: its ``final/`` bundle, or ``checkpoints/step-N`` with ``step=N`` / ``latest``;
    - the single engine's ``state.pt`` (or its ``checkpoints/step-N`` folder);
    - a DeepSpeed checkpoint of this toolkit, ZeRO 0 to 2, any number of processes (the step folder, its
      ``deepspeed/`` folder, the tag folder or ``mp_rank_00_model_states.pt``); only the module states are read;
    - an official "torch" or "ds" file.

    What an export to ``path`` stopped midway left beside it is put right first (:func:`recover_export`).
    """
    path = Path(path)
    if kind is not None and kind not in KIND_LABELS:
        raise CheckpointError(f"unknown source kind {kind!r}; choose one of: {', '.join(KIND_LABELS)}")
    recover_export(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (step is not None or latest) and kind not in (None, "run"):
        raise CheckpointError("--step and --latest pick a checkpoint inside a run directory")
    given = None
    if path.is_dir():
        found = _folder_kind(path)
        if (step is not None or latest or kind == "run") and found != "run":
            raise CheckpointError(f"{path} is not a run directory (no checkpoints/, final/ or config.yaml in it)")
        if found == "run":
            given, path = path, _run_choice(path, step, latest)
            found = _folder_kind(path)
        if found is None or found == "run":
            raise CheckpointError(f"{path} is not a checkpoint: neither a bundle, a run directory, a training "
                                  f"checkpoint (state.pt or deepspeed/) nor an official file")
        if kind not in (None, "run") and found != kind:
            raise CheckpointError(f"{path} is not a {KIND_LABELS[kind]} (it looks like a {KIND_LABELS[found]})")
        if found == "bundle":
            run_dir = _final_of(path)
            return Source("bundle", path, path / BUNDLE_WEIGHTS, run_dir=run_dir, given=given,
                          step=_final_step(path) if run_dir is not None else None)
        file = path / STATE_FILE if found == "state" else _deepspeed_folder(path) / DEEPSPEED_MODEL
        return _file_source(file, kind, given, label=path)
    if path.suffix == ".safetensors":
        if kind not in (None, "bundle") or not (path.parent / BUNDLE_CONFIG).is_file():
            raise CheckpointError(f"{path}: a .safetensors file is read as part of a bundle, and "
                                  f"{path.parent / BUNDLE_CONFIG} is missing")
        return Source("bundle", path.parent, path)
    if kind in ("bundle", "run"):
        raise CheckpointError(f"{path} is a file, not a {KIND_LABELS[kind]} folder")
    return _file_source(path, kind, None, label=path)


def _final_of(path: Path) -> Path | None:
    return path.parent if path.name == "final" and (path.parent / "config.yaml").is_file() else None


def _final_step(path: Path) -> int | None:
    train = _run_recipe(path.parent).get("train")
    steps = train.get("steps") if isinstance(train, dict) else None
    return steps if isinstance(steps, int) else None


def _run_choice(run_dir: Path, step: int | None, latest: bool) -> Path:
    folders = _step_folders(run_dir)
    available = ", ".join(str(int(p.name.split("-")[1])) for p in folders) or "none"
    if step is not None:
        chosen = [p for p in folders if int(p.name.split("-")[1]) == step]
        if not chosen:
            raise CheckpointError(f"run {run_dir} has no checkpoint of step {step} (available: {available})")
        return chosen[0]
    if latest:
        if not folders:
            raise CheckpointError(f"run {run_dir} has no checkpoints")
        return folders[-1]
    if not (run_dir / "final").is_dir():
        raise CheckpointError(f"run {run_dir} has no final/ bundle (not finished); pick a checkpoint with --step N "
                              f"(available: {available}) or --latest")
    return run_dir / "final"


def _file_source(file: Path, kind: str | None, given: Path | None, label: Path) -> Source:
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} does not exist")
    obj = _load_torch_file(file)
    found, state, fmt = classify_container(obj, file)
    if kind not in (None, "run") and found != kind:
        raise CheckpointError(f"{file} is not a {KIND_LABELS[kind]} (it is a {KIND_LABELS[found]})")
    source = Source(found, label, file, run_dir=_run_of(file), given=given, format=fmt, state=state)
    if found == "deepspeed":
        source.zero_stage, source.processes = _check_ranks(file.parent, obj)
        source.state, source.expert_parallel = _stack_experts(state, file)
        client = obj.get(CLIENT_KEY)
        recorded = client.get("step") if isinstance(client, dict) else obj.get("global_steps")
        source.step = recorded if isinstance(recorded, int) else None
    elif found == "state" and isinstance(obj.get("step"), int):
        source.step = obj["step"]
    return source


_EXPERT_SHARD = re.compile(r"^rank-(\d{3})-of-(\d{3})\.safetensors$")


def _stack_experts(state: dict[str, torch.Tensor], file: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """An expert-parallel run's DeepSpeed checkpoint: its module states (rank 0's) hold only rank 0's experts, and
    every expert-parallel rank's experts are in ``experts/`` beside the DeepSpeed folder. Stack them in expert
    order; returns the state and the expert-parallel size (None: not expert-parallel)."""
    folder = file.parent.parent.parent / EXPERTS_DIR  # step-N/deepspeed/<tag>/mp_rank_00_model_states.pt
    found = {m.group(1, 2) for m in (_EXPERT_SHARD.match(p.name) for p in folder.iterdir()) if m} \
        if folder.is_dir() else set()
    if not found:
        return state, None
    sizes = {int(size) for _, size in found}
    if len(sizes) != 1:
        raise CheckpointError(f"{folder} mixes expert shards of {len(sizes)} expert-parallel sizes")
    size = sizes.pop()
    missing = sorted(set(range(size)) - {int(rank) for rank, _ in found})
    if missing:
        raise CheckpointError(f"{folder} is incomplete: it was written by {size} expert-parallel ranks but the "
                              f"experts of rank(s) {', '.join(map(str, missing))} are missing")
    shards = [_read_safetensors(folder / expert_shard_file(rank, size)) for rank in range(size)]
    keys = set(shards[0])
    if not keys or any(set(shard) != keys for shard in shards):
        raise CheckpointError(f"{folder}: the expert shards do not hold the same tensors")
    state = dict(state)
    for key in sorted(keys):
        parts = [shard[key] for shard in shards]
        if key not in state or parts[0].dim() == 0 or any(p.shape != state[key].shape for p in parts):
            raise CheckpointError(f"{folder}: the expert shards do not fit the checkpoint's {key}")
        state[key] = torch.cat(parts)
    return state, size


def _run_recipe(run_dir: Path | None) -> dict[str, Any]:
    """The run's resolved recipe (``config.yaml``), or {} when there is none. It is parsed as recipes are (no
    aliases, no duplicate keys: :func:`uniperceiver_cli.train.recipe.read_yaml`), after its size is checked."""
    path = run_dir / "config.yaml" if run_dir is not None else None
    if path is None or not path.is_file():
        return {}
    from uniperceiver_cli.train.recipe import RecipeError, read_yaml

    try:
        data = read_yaml(_read_small_file(path).decode("utf-8"), str(path))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    except RecipeError as e:  # its message starts with the path
        raise CheckpointError(str(e)) from None
    return data if isinstance(data, dict) else {}


@dataclass
class Weights:
    """A source's weights in our names, with what the model config and provenance need."""

    state: dict[str, torch.Tensor]
    config: ModelConfig | None = None  # from a bundle or the run's config.yaml; None: infer from the shapes
    targets: Targets = field(default_factory=lambda: Targets())
    unknown: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    recipe: str | None = None
    provenance: dict[str, Any] | None = None  # a bundle's own


def read_weights(source: Source, fold_video_type: bool | None = None) -> Weights:
    """The weights of a located source, mapped onto our names (official files only; ours are never renamed)."""
    recipe = _run_recipe(source.run_dir)
    name = recipe.get("name") if isinstance(recipe.get("name"), str) else None
    if source.kind == "bundle":
        config, state, targets, previous = _read_bundle(source.path)
        if name is None and isinstance(previous, dict):
            name = previous.get("recipe")
        return Weights(state, config, targets, recipe=name, provenance=previous)
    if source.kind == "official":
        state, unknown, dropped = convert_official(source.state, source.format, fold_video_type)
        return Weights(state, unknown=unknown, dropped=dropped)
    model = recipe.get("model")
    config = None
    if isinstance(model, dict) and model.get("preset"):
        overrides = model.get("overrides") or {}
        try:
            config = get_config(model["preset"], **overrides)
            if config.moe is not None and config.moe.routing == "task":  # training routed the recipe's tasks
                names = [t.get("name") for t in recipe.get("tasks") or [] if isinstance(t, dict)]
                config = dataclasses.replace(config, moe=config.moe.routing_tasks(names))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"the model of {source.run_dir / 'config.yaml'} is not a valid config: "
                                  f"{' '.join(str(e).split())}") from None
    return Weights(dict(source.state), config, recipe=name)


def _our_config(state: dict[str, torch.Tensor], path: Path) -> ModelConfig:
    """The config of our-named weights without a recipe: a preset of exactly these shapes, else refused (the
    head count, image size and other fields cannot be read from the weights)."""
    try:
        config = infer_config(state)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"cannot tell the model config of {path} from its weights ({e}); give --preset") \
            from None
    if any((p["width"], p["layers"], p["mlp_dim"]) == (config.width, config.layers, config.mlp_dim)
           and (p.get("moe") is None) == (config.moe is None) for p in PRESETS.values()):
        return config  # infer_config took that preset's head count and other fields
    raise CheckpointError(f"{path} has no config.yaml next to its checkpoints/ and its shapes (width "
                          f"{config.width}, {config.layers} layers, MLP {config.mlp_dim}) match no preset; give "
                          f"--preset")


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
    expected = model.state_dict()
    relabelled = [k for k, v in usable.items() if expected[k].is_floating_point() and not v.is_floating_point()]
    if relabelled:  # load_state_dict would convert integers into the float weights without a word
        raise CheckpointError(f"checkpoint {path}: tensor {relabelled[0]} is {usable[relabelled[0]].dtype}, not a "
                              f"floating-point dtype a weight takes ({len(relabelled)} such tensor(s))")
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
    """Load any checkpoint :func:`load_model` accepts (or a bare ``.safetensors`` file) into ``model``.

    With ``strict`` (the default) any missing, unexpected or mis-shaped key raises a one-line
    :class:`CheckpointError` naming them; otherwise the fitting tensors are loaded and the report says
    what was left out. A bundle also sets what its weights were trained over (``model.class_names``,
    ``model.caption_vocabulary``); any other file records neither, so both become None.
    """
    path = Path(path)
    if path.suffix == ".safetensors":  # the weights alone: no targets
        state = _read_safetensors(path)
        report = _apply(model, state, check_state(model, state), path, strict)
        Targets().apply(model)
        return report
    source = find_source(path)
    weights = read_weights(source, fold_video_type)
    if weights.config is not None and weights.config.folded and not model.config.folded:
        raise CheckpointError(f"{source.path} holds a model with folded experts, and a folded model is for "
                              f"inference only: it loads only as itself (load_model); train from the unfolded model")
    report = _apply_official(model, weights.state, weights.unknown, weights.dropped, source.path, strict)
    weights.targets.apply(model)
    return report


def _apply_official(model: UniPerceiver, state: dict[str, torch.Tensor], unknown: list[str],
                    dropped: list[str], path: Path, strict: bool) -> LoadReport:
    report = check_state(model, state)
    report.unexpected = sorted(report.unexpected + unknown)
    report.dropped = dropped
    return _apply(model, state, report, path, strict)


def model_config(source: Source, weights: Weights, preset: str | ModelConfig | None = None,
                 **overrides: object) -> ModelConfig:
    """The model config of a source: ``preset`` and overrides when given, else the bundle's or the run's
    recorded one, else inferred from the weights' shapes."""
    if preset is not None:
        return get_config(preset, **overrides)
    if weights.config is not None:
        return get_config(weights.config, **overrides) if overrides else weights.config
    if source.kind == "official":
        try:
            return infer_config(weights.state, **overrides)
        except KeyError as e:
            raise CheckpointError(f"{source.weights} lacks {e.args[0]}, needed to infer the model's shape") from e
    config = _our_config(weights.state, source.weights)
    return get_config(config, **overrides) if overrides else config


def _check_fits(source: Source, weights: Weights, config: ModelConfig, strict: bool) -> None:
    """Refuse, before any memory is allocated for it, a model ``config`` describes that the weights cannot fill: a
    config (a bundle's ``config.json`` or a run's ``config.yaml`` is a file a user may be handed) with more layers
    than the weights hold, or more parameters (counted on the ``meta`` device, which allocates nothing); with
    ``strict`` any key or shape that does not fit, as :func:`load_checkpoint` reports it."""
    held = len({key.split(".")[1] for key in weights.state if key.startswith("blocks.")})
    if config.layers > held:
        raise CheckpointError(f"checkpoint {source.path} does not fit the model: the config has {config.layers} "
                              f"layers, the weights {held}")
    try:
        with torch.device("meta"):
            shapes = UniPerceiver(config)
    except (ValueError, TypeError, RuntimeError) as e:  # torch's RuntimeError for impossible sizes
        raise CheckpointError(f"the config of {source.path} does not build a model: {' '.join(str(e).split())}") from e
    report = check_state(shapes, weights.state)
    report.unexpected = sorted(report.unexpected + weights.unknown)
    if strict and not report.ok:
        raise CheckpointError(f"checkpoint {source.path} does not fit the model: {report.summary()}")
    needed = sum(t.numel() for t in shapes.state_dict().values())
    have = sum(t.numel() for t in weights.state.values())
    if needed > have:
        raise CheckpointError(f"checkpoint {source.path} does not fit the model: the config describes {needed:,} "
                              f"parameters, more than the {have:,} the weights hold")


def build_model(source: Source, weights: Weights, config: ModelConfig, strict: bool = True) -> UniPerceiver:
    """The model of ``config`` holding the source's weights (strict: every key and shape must fit). It is built only
    once the config is known to fit the weights (never larger than they are, even when not ``strict``)."""
    _check_fits(source, weights, config, strict)
    model = UniPerceiver(config)
    _apply_official(model, weights.state, weights.unknown, weights.dropped, source.path, strict)
    weights.targets.apply(model)
    return model.eval()


def load_model(path: str | Path | Source, *, preset: str | None = None, strict: bool = True,
               fold_video_type: bool | None = None, kind: str | None = None, step: int | None = None,
               latest: bool = False, **overrides: object) -> UniPerceiver:
    """A model built from a checkpoint of any kind :func:`find_source` accepts (a bundle, a run directory,
    a training checkpoint of either engine, an official file). A bundle carries its config, a run its
    ``config.yaml``; otherwise the config is inferred from the weights' shapes (or given by ``preset`` and
    field overrides). A config whose model the weights cannot fill is refused before the model is allocated
    (:func:`build_model`)."""
    source = path if isinstance(path, Source) else find_source(path, kind=kind, step=step, latest=latest)
    weights = read_weights(source, fold_video_type)
    return build_model(source, weights, model_config(source, weights, preset, **overrides), strict)


def source_provenance(source: Source, weights: Weights) -> dict[str, Any]:
    """What ``config.json`` records about where exported weights came from."""
    from uniperceiver_cli import __version__

    record: dict[str, Any] = {"source": str((source.given or source.path).resolve()), "kind": source.kind,
                              "file": str(source.weights.resolve()), "sha256": sha256_of(source.weights),
                              "step": source.step, "recipe": weights.recipe, "toolkit_version": __version__}
    if source.zero_stage is not None:
        record.update(zero_stage=source.zero_stage, processes=source.processes)
    if weights.provenance is not None:
        record["previous"] = weights.provenance
    return record
