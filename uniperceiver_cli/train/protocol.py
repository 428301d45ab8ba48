"""The contract between the training loop and its engines (:class:`Engine`), where a process runs
(:class:`Context`), and what either engine's checkpoint holds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

STATE_FILE = "state.pt"  # the single engine's checkpoint inside checkpoints/step-N
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's checkpoint folder inside checkpoints/step-N
DEEPSPEED_TAG = "state"  # the tag of DeepSpeed's checkpoint inside that folder
CLIENT_KEY = "uniperceiver"  # the loop's own state (step, data position, RNGs) inside DeepSpeed's checkpoint
# Expert parallelism: each expert-parallel rank's experts, beside DeepSpeed's folder inside checkpoints/step-N
EXPERTS_DIR = "experts"


def expert_shard_file(rank: int, size: int) -> str:
    """The file of expert-parallel rank ``rank`` of ``size`` inside :data:`EXPERTS_DIR`."""
    return f"rank-{rank:03d}-of-{size:03d}.safetensors"
FP16_INITIAL_SCALE_POWER = 13  # the reference's GradScaler: initial scale 2**13, growth every 200 steps
FP16_GROWTH_INTERVAL = 200

_multiarray = getattr(np, "_core", None) or np.core
# Checkpoints of older versions hold numpy's RNG state as an array: accept numpy's plain array rebuild
# (no code of the file's choosing runs; object arrays' items go through the same restricted unpickler).
STATE_GLOBALS = (_multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)))


@dataclass
class Context:
    """Where this process sits: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


class Engine(Protocol):
    """What the loop calls. ``model`` is the trained module itself, whose methods the tasks call."""

    model: nn.Module

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss / accumulation`` (averaged over the processes by the step's end)."""

    def micro_step(self) -> None:
        """Called after each micro-batch."""

    def step(self) -> torch.Tensor | float | None:
        """Called at each step's end: clip, step the optimizer and schedule; the gradient norm when known."""

    def lr(self) -> float:
        """The learning rate of the first parameter group."""

    def barrier(self) -> None:
        """Wait for every process."""

    def inference_model(self) -> nn.Module | None:
        """The whole model, for evaluation and the final bundle; every process calls it (with expert parallelism
        the experts are gathered), the main process gets the model."""

    def save(self, directory: Path, client: dict[str, Any]) -> None:
        """Write the engine's state and the loop's ``client`` state into ``directory``; every process calls it."""

    def load(self, directory: Path) -> dict[str, Any]:
        """Restore what :meth:`save` wrote; returns the loop's ``client`` state."""
