"""The contract between the training loop and its engines (:class:`Engine`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

FP16_INITIAL_SCALE_POWER = 13  # the reference's GradScaler: initial scale 2**13, growth every 200 steps
FP16_GROWTH_INTERVAL = 200


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
