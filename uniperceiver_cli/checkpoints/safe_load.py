"""The one way into ``torch.load``: ``weights_only=True``, with the allow-list of what each kind of file may pickle
beyond tensors and plain containers. Nothing else in a file runs; a file that cannot be read raises one line."""

from __future__ import annotations

import argparse
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uniperceiver_cli.checkpoints.errors import CheckpointError

_multiarray = getattr(np, "_core", None) or np.core
# Checkpoints of older versions hold numpy's RNG state as an array: accept numpy's plain array rebuild
# (no code of the file's choosing runs; object arrays' items go through the same restricted unpickler).
STATE_GLOBALS = (_multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)))
# A checkpoint file of any kind: the reference's DeepSpeed files also pickle their launch arguments.
CHECKPOINT_GLOBALS = (argparse.Namespace, *STATE_GLOBALS)


def deepspeed_records() -> tuple[type, ...]:
    """The plain DeepSpeed classes its ZeRO optimizer states pickle: a loss scaler, a ZeRO stage enum, a
    fragment address (imports deepspeed)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address


def torch_load(path: str | Path, failure: str = "cannot read checkpoint", allowed: tuple[type | Any, ...] = (),
               map_location: Any = "cpu", *, deepspeed: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors, plain containers and the ``allowed`` globals; with
    ``deepspeed`` also :func:`deepspeed_records`, when the file names them (deepspeed is imported only then).
    Anything else in the file is refused before it runs; a file that cannot be read raises one line,
    ``{failure} {path}: truncated, corrupt or unsafe (why)``."""
    if deepspeed:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path) if zipfile.is_zipfile(path) else []
        except Exception:  # noqa: BLE001 - a damaged file: torch.load below names the problem
            names = []
        if any(name.startswith("deepspeed.") for name in names):
            allowed = (*allowed, *deepspeed_records())
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
