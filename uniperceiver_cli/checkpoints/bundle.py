"""The bundle: ``model.safetensors`` + ``config.json`` (model config, tokenizer, preprocessing, targets, provenance),
written atomically, read with its dtypes and targets checked; and the staging folders of ``uniperceiver export``."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from uniperceiver_cli.checkpoints.errors import CheckpointError, CheckpointWarning
from uniperceiver_cli.checkpoints.runs import read_side_file
from uniperceiver_cli.model.config import (
    EOT_ID,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPE_ID,
    VIDEO_MEAN,
    VIDEO_STD,
    ModelConfig,
)
from uniperceiver_cli.model.uniperceiver import Targets, UniPerceiver

BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_CONFIG = "config.json"
BUNDLE_FORMAT = "uniperceiver-bundle"
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
        "tokenizer": {"type": "clip-bpe", "vocab_size": model.config.vocab_size, "eot_id": EOT_ID, "spe_id": SPE_ID},
        "preprocessing": preprocessing(model.config),
        "targets": {"class_names": model.class_names,
                    "caption_vocabulary": None if vocabulary is None else vocabulary.tolist()},
    }
    if provenance is not None:
        meta["provenance"] = provenance
    tmp = directory / (BUNDLE_CONFIG + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, directory / BUNDLE_CONFIG)
    return directory


def preprocessing(config: ModelConfig) -> dict[str, Any]:
    """What a bundle records of its inputs' preprocessing: the reference's, at the model's image size."""
    return {"image_size": config.image_size, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
            "video_mean": list(VIDEO_MEAN), "video_std": list(VIDEO_STD)}


def check_preprocessing(directory: Path, config: ModelConfig) -> None:
    """Refuse a bundle whose recorded preprocessing is not the one this version builds for its model (a hand-edited
    ``config.json``): transforms built otherwise would feed the weights pixels they were not trained on. Bundles
    written before it was recorded have none and get the model's."""
    path = directory / BUNDLE_CONFIG
    recorded = json.loads(read_side_file(path)).get("preprocessing") if path.is_file() else None
    expected = preprocessing(config)
    if recorded is not None and recorded != expected:
        differ = sorted(k for k in set(expected) | set(recorded) if recorded.get(k) != expected.get(k)) \
            if isinstance(recorded, dict) else ["preprocessing"]
        raise CheckpointError(f"{path} records preprocessing this version does not build for its model "
                              f"({', '.join(differ)} differ from the reference's {expected})")


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


def read_bundle(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Targets, Any]:
    """A bundle's config, weights, targets and provenance record (None where it has none)."""
    config_path = directory / BUNDLE_CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"{directory} is not a model bundle: {BUNDLE_CONFIG} is missing")
    data = read_side_file(config_path)
    try:
        meta = json.loads(data)
        config = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError, RecursionError) as e:  # ValueError: JSON and unicode errors too
        raise CheckpointError(f"cannot read {config_path}: {' '.join(str(e).split())}") from e
    targets = _read_targets(meta, config, config_path)
    return config, read_safetensors(directory / BUNDLE_WEIGHTS), targets, meta.get("provenance")


# The model's state is floating point only (its buffers are not saved); the dtypes its weights may come in.
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
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

