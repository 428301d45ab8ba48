"""Task losses: (label-smoothed) cross entropy, soft-target cross entropy for Mixup/CutMix, bidirectional
retrieval; and the router losses of token and context routing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from uniperceiver_cli.model.moe import RouterStats


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Hard targets (N,), or soft targets (N, C) from Mixup/CutMix (which already carry their smoothing).

    Label smoothing s gives (1 - s) * NLL + s * mean over classes of -log p, the reference's
    ``LabelSmoothingCrossEntropy``. Entries of -1 are ignored.
    """
    logits = logits.float()
    if target.dim() == 2:
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, target, label_smoothing=smoothing, ignore_index=-1)


def retrieval_loss(logits: torch.Tensor, smoothing: float = 0.0, t2i: torch.Tensor | None = None) -> torch.Tensor:
    """Image-to-text plus text-to-image cross entropy: row i matches column i. ``t2i`` defaults to the transpose
    of the image-to-text ``logits`` (in-batch negatives); with gathered negatives each direction has its own."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return cross_entropy(logits, target, smoothing) + cross_entropy(logits.t() if t2i is None else t2i, target,
                                                                    smoothing)


def router_loss(stats: RouterStats, balance_weight: float, z_weight: float) -> torch.Tensor:
    """What token and context routing add to a task loss: the weighted load-balancing loss and router z-loss."""
    return balance_weight * stats.balance_loss + z_weight * stats.z_loss
