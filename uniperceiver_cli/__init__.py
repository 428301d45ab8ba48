"""Uni-Perceiver and Uni-Perceiver-MoE: one generalist Transformer for images, video and text.

Public API::

    import uniperceiver_cli as up
    model = up.create_model("base")            # or up.load_model("bundle_dir" | "official.pth")
    tokenizer = up.get_tokenizer()
    feats = model.encode_image(images)         # (B, D), L2-normalised
"""

from __future__ import annotations

from typing import Any

from uniperceiver_cli.checkpoints import CheckpointError, load_checkpoint, load_model, save_bundle
from uniperceiver_cli.model.config import PRESETS, ModelConfig, MoEConfig, PromptConfig, get_config
from uniperceiver_cli.model.tokenizer import Tokenizer, get_tokenizer
from uniperceiver_cli.model.uniperceiver import UniPerceiver

__version__ = "0.1.0"


def create_model(preset: str | ModelConfig = "base", **overrides: Any) -> UniPerceiver:
    """A freshly initialised model from a preset name (or config), with any config field overridden."""
    return UniPerceiver(get_config(preset, **overrides))


__all__ = [
    "PRESETS", "CheckpointError", "ModelConfig", "MoEConfig", "PromptConfig", "Tokenizer", "UniPerceiver",
    "__version__", "create_model", "get_config", "get_tokenizer", "load_checkpoint", "load_model", "save_bundle",
]
