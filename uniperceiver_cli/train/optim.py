"""AdamW with the reference's parameter groups, the warmup-cosine schedule, and prompt-tuning freezing."""

from __future__ import annotations

import math

import torch

from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.train.recipe import TrainSpec


def freeze_for_prompt_tuning(model: UniPerceiver) -> list[str]:
    """Freeze everything but the model's prompt parameters; returns the names left trainable."""
    prompts = model.prompt_parameters()
    for name, param in model.named_parameters():
        param.requires_grad_(name in prompts)
    if not prompts:
        raise ValueError("prompt tuning found no prompt parameters to train")
    return [name for name, _ in model.named_parameters() if name in prompts]


def param_groups(model: UniPerceiver, weight_decay: float) -> list[dict]:
    decay, rest, no_decay = [], [], model.no_weight_decay()
    for name, param in model.named_parameters():
        if param.requires_grad:
            (rest if name in no_decay else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_optimizer(model: UniPerceiver, spec: TrainSpec, groups: list[dict] | None = None) -> torch.optim.AdamW:
    """AdamW, fused: one kernel per parameter group (CPU and CUDA) instead of a loop over the tensors. ``groups``
    defaults to :func:`param_groups`."""
    return torch.optim.AdamW(groups or param_groups(model, spec.weight_decay), lr=spec.lr, betas=tuple(spec.betas),
                             eps=spec.eps, fused=True)


def warmup_cosine(step: int, spec: TrainSpec) -> float:
    """Learning rate at ``step``: linear from 0 over the warmup, then cosine down to ``min_lr``."""
    if step < spec.warmup_steps:
        return spec.lr * step / spec.warmup_steps
    span = max(1, spec.steps - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    return spec.min_lr + (spec.lr - spec.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, spec: TrainSpec) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, spec) / spec.lr)
