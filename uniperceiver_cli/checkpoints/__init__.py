"""Checkpoints: every kind the toolkit reads, and our bundle. The run directory's layout is :mod:`.runs`; every
``torch.load`` goes through :mod:`.safe_load` (``weights_only=True``). The public names are re-exported here, imported
on first use (PEP 562) so that a torch-free module of the package (:mod:`.pretrained`, :mod:`.errors`) loads without
torch; the package's own modules import each from the module that defines it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from uniperceiver_cli.checkpoints.bundle import save_bundle
    from uniperceiver_cli.checkpoints.errors import CheckpointError, CheckpointWarning
    from uniperceiver_cli.checkpoints.loading import LoadReport, load_checkpoint, load_model
    from uniperceiver_cli.checkpoints.official import convert_official, infer_config
    from uniperceiver_cli.checkpoints.sources import Source, find_source, read_official

_LAZY = {
    "save_bundle": "bundle", "CheckpointError": "errors", "CheckpointWarning": "errors", "LoadReport": "loading",
    "load_checkpoint": "loading", "load_model": "loading", "convert_official": "official", "infer_config": "official",
    "Source": "sources", "find_source": "sources", "read_official": "sources",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "CheckpointError", "CheckpointWarning", "LoadReport", "Source", "convert_official", "find_source", "infer_config",
    "load_checkpoint", "load_model", "read_official", "save_bundle",
]
