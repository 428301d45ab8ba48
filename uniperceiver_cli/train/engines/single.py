"""``engine: single``: one process, plain PyTorch (CPU or one GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from uniperceiver_cli.checkpoints.errors import CheckpointError
from uniperceiver_cli.checkpoints.runs import STATE_FILE
from uniperceiver_cli.checkpoints.safe_load import STATE_GLOBALS, torch_load
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.parallel.context import Context
from uniperceiver_cli.train.engines.protocol import FP16_GROWTH_INTERVAL, FP16_INITIAL_SCALE_POWER
from uniperceiver_cli.train.optim import build_optimizer, build_scheduler
from uniperceiver_cli.train.recipe import Recipe


def load_state_file(path: Path) -> dict[str, Any]:
    """A training-state file (``state.pt``) loaded without running pickled code: only tensors, plain
    containers and numpy's plain arrays are accepted (``weights_only=True``), so a planted file cannot run."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    state = torch_load(path, "cannot resume from", STATE_GLOBALS)
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot resume from {path}: not a training state")
    return state


class SingleEngine:
    """Plain PyTorch: backward, then clip, step the optimizer and the schedule at each step's end.

    A step looks the word table up several times (texts, each sequence's <|spe|>, target vocabularies). With
    dense gradients every lookup's backward writes a whole vocab_size x width table; here the lookups give
    sparse gradients, added once per step into a kept dense buffer before clipping, and AdamW steps the table
    densely as the reference does (faster on the CPU: benchmarks/train_steps.py).
    """

    def __init__(self, model: UniPerceiver, recipe: Recipe, ctx: Context) -> None:
        self.model = model.to(ctx.device)
        self.model.text_embed.word.sparse = True
        self._word_grad: torch.Tensor | None = None
        self.spec = recipe.train
        self.optimizer = build_optimizer(model, recipe.train)
        self.scheduler = build_scheduler(self.optimizer, recipe.train)
        fp16 = recipe.train.precision == "fp16" and ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(ctx.device.type, init_scale=2.0**FP16_INITIAL_SCALE_POWER,
                                            growth_interval=FP16_GROWTH_INTERVAL, enabled=fp16)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.spec.accumulation).backward()

    def micro_step(self) -> None:
        """Called after each micro-batch; the plain engine steps only at the end of the step."""

    def _densify_word_grad(self) -> None:
        weight = self.model.text_embed.word.weight
        if weight.grad is None or not weight.grad.is_sparse:
            return
        if self._word_grad is None:
            self._word_grad = torch.zeros_like(weight)
        else:
            self._word_grad.zero_()
        weight.grad = self._word_grad.add_(weight.grad)

    def step(self) -> torch.Tensor:
        self._densify_word_grad()
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.spec.grad_clip if self.spec.grad_clip > 0 else float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def barrier(self) -> None:
        """Nothing to wait for in one process."""

    def inference_model(self) -> torch.nn.Module:
        return self.model

    def save(self, directory: Path, client: dict[str, Any]) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), **client}
        with open(directory / STATE_FILE, "wb") as file:  # a failed write keeps its OSError as the error's context
            torch.save(state, file)

    def load(self, directory: Path) -> dict[str, Any]:
        path = directory / STATE_FILE
        state = load_state_file(path)
        try:
            self.model.load_state_dict(state.pop("model"))
            self.optimizer.load_state_dict(state.pop("optimizer"))
            self.scheduler.load_state_dict(state.pop("scheduler"))
            self.scaler.load_state_dict(state.pop("scaler"))
        except (KeyError, RuntimeError, ValueError) as e:
            reason = " ".join(str(e).split())[:300]
            raise CheckpointError(f"cannot resume from {path}: it does not fit this run ({reason})") from None
        return state
