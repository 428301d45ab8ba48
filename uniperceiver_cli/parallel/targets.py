"""Large target sets encoded across the data-parallel processes, as the reference's ``SHARED_TARGETS`` with
``DISTRIBUTED: True``: each process encodes ``ceil(N / world)`` rows and an autograd-aware all-gather joins
the features, so the activations kept for the backward are a process's slice, not the whole set.

Every process of a step runs the same task (the task draws are seeded alike), so all encode their slice of
the same set together. The gradient of a slice comes back to the process that encoded it summed over every
process's loss (the all-gather's backward), which is what encoding the whole set on every process gives once
DeepSpeed averages the gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed.nn.functional import all_gather


@dataclass(frozen=True)
class TargetSplit:
    """Which slice of a target set this process encodes: sets of at least ``min_rows`` rows are split."""

    rank: int
    world_size: int
    min_rows: int

    def rows(self, n: int) -> int:
        """The rows of a set of ``n`` this process encodes: ceil(n / world) when the set is split, else n."""
        if self.world_size == 1 or n < max(self.min_rows, 1):
            return n
        return -(-n // self.world_size)

    def encode(self, encode: Callable[..., torch.Tensor], *rows: torch.Tensor | None) -> torch.Tensor:
        """``encode(*rows)`` for a whole set (every tensor of ``rows`` has one entry per target along dim 0; a None,
        such as no padding, is passed on as it is), each process encoding its slice. Every process must call it
        with the same set. The slices are of equal size (the last padded with copies of the last row, dropped
        after the gather)."""
        n = rows[0].shape[0]
        per = self.rows(n)
        if per == n:
            return encode(*rows)
        mine = torch.arange(self.rank * per, (self.rank + 1) * per, device=rows[0].device).clamp(max=n - 1)
        features = encode(*(None if r is None else r[mine] for r in rows))
        # fp32 (features are bf16 under autocast): the backward sums every process's gradient of a slice
        wide = features.to(torch.promote_types(features.dtype, torch.float32))
        return torch.cat(all_gather(wide.contiguous()))[:n]


def with_others(local: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """``local`` (B, D) followed by every other process's (B, D) in rank order, without gradient through theirs:
    the reference's ``FEATURE_GATHER`` retrieval negatives. Every process must call it with the same shape (a
    training batch is always full)."""
    parts = [torch.empty_like(local) for _ in range(world_size)]
    torch.distributed.all_gather(parts, local.detach().contiguous())
    return torch.cat([local, *(part for i, part in enumerate(parts) if i != rank)])
