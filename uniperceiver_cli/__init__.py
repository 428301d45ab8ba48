"""Uni-Perceiver and Uni-Perceiver-MoE: one generalist Transformer for images, video and text.

Public API::

    import uniperceiver_cli as up
    model = up.create_model("base")            # or up.load_model("bundle_dir" | "official.pth" | "uni-perceiver-base")
    model, image_tf, video_tf, tokenizer = up.load_model_and_transforms("bundle_dir")
    tokenizer = up.get_tokenizer()
    feats = model.encode_image(images)         # (B, D), L2-normalised
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from uniperceiver_cli.version import __version__

if TYPE_CHECKING:
    from uniperceiver_cli.checkpoints.bundle import save_bundle
    from uniperceiver_cli.checkpoints.errors import CheckpointError
    from uniperceiver_cli.checkpoints.loading import load_checkpoint, load_model, load_model_and_transforms
    from uniperceiver_cli.checkpoints.pretrained import list_pretrained
    from uniperceiver_cli.model.config import PRESETS, ModelConfig, MoEConfig, PromptConfig, get_config
    from uniperceiver_cli.model.tokenizer import Tokenizer, get_tokenizer
    from uniperceiver_cli.model.uniperceiver import UniPerceiver

# The public names and the module each comes from. They are imported on first use (PEP 562) because
# these modules pull in torch and timm (seconds), which `uniperceiver --help` or `recipes ls` never need.
_LAZY = {
    "CheckpointError": "uniperceiver_cli.checkpoints.errors", "save_bundle": "uniperceiver_cli.checkpoints.bundle",
    "load_checkpoint": "uniperceiver_cli.checkpoints.loading", "load_model": "uniperceiver_cli.checkpoints.loading",
    "load_model_and_transforms": "uniperceiver_cli.checkpoints.loading",
    "list_pretrained": "uniperceiver_cli.checkpoints.pretrained",
    "PRESETS": "uniperceiver_cli.model.config", "ModelConfig": "uniperceiver_cli.model.config",
    "MoEConfig": "uniperceiver_cli.model.config", "PromptConfig": "uniperceiver_cli.model.config",
    "get_config": "uniperceiver_cli.model.config",
    "Tokenizer": "uniperceiver_cli.model.tokenizer", "get_tokenizer": "uniperceiver_cli.model.tokenizer",
    "UniPerceiver": "uniperceiver_cli.model.uniperceiver",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def create_model(preset: str | ModelConfig = "base", **overrides: Any) -> UniPerceiver:
    """A freshly initialised model from a preset name (or config), with any config field overridden."""
    from uniperceiver_cli.model.config import get_config
    from uniperceiver_cli.model.uniperceiver import UniPerceiver

    return UniPerceiver(get_config(preset, **overrides))


__all__ = [
    "PRESETS", "CheckpointError", "ModelConfig", "MoEConfig", "PromptConfig", "Tokenizer", "UniPerceiver",
    "__version__", "create_model", "get_config", "get_tokenizer", "list_pretrained", "load_checkpoint", "load_model",
    "load_model_and_transforms", "save_bundle",
]
