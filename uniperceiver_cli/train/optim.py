"""AdamW with the reference's parameter groups, the warmup-cosine schedule, and prompt-tuning freezing."""

from __future__ import annotations

import math

import torch
from torch import nn

from uniperceiver_cli.train.recipe import TrainSpec


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases and every other 1-D parameter, embedding tables, temperatures, layer scales, MoE gates
    and prompts take no weight decay (reference 5.3)."""
    return (param.dim() <= 1 or name.endswith(".bias") or "logit_scale" in name or ".gamma" in name
            or ".gate." in name or name.startswith(("text_embed.", "visual_embed.temporal"))
            or name.endswith(("prompt", "spe_bias")))


def prompt_parameter(name: str) -> bool:
    """What prompt tuning trains (reference 7.1): every encoder LayerNorm, ln_post, the <|spe|> bias, the deep
    prompts and the classifier prompt. The MoE gates' own norms stay frozen, as in the reference."""
    if ".gate." in name:
        return False
    return (".norm" in name or name.startswith(("embed_norm.", "head.ln_post.", "head.fc_prompt.")) or
            name in ("text_embed.spe_bias", "head.similarity_weight") or name.endswith(("prompt", "target_prompt")))


def freeze_for_prompt_tuning(model: nn.Module) -> list[str]:
    """Freeze everything but the prompt parameters; returns the names left trainable."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(prompt_parameter(name))
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError("prompt tuning found no prompt parameters to train")
    return trainable


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (rest if no_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.AdamW:
    """AdamW, fused: one kernel per parameter group (CPU and CUDA) instead of a loop over the tensors."""
    return torch.optim.AdamW(param_groups(model, spec.weight_decay), lr=spec.lr, betas=tuple(spec.betas),
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
