"""Evaluation on several processes (``torchrun``): each process evaluates its share of the split (the loader deals
the shards, or the samples of a split with fewer shards, out by rank) and the per-sample outputs are gathered on
every process before the metrics, which are then those of one process over the whole split."""

from __future__ import annotations

from typing import TypeVar

import torch

from uniperceiver_cli.parallel.context import Context

T = TypeVar("T")


def gather(part: T, ctx: Context | None) -> list[T]:
    """Every process's ``part``, in rank order (CPU tensors, lists and dicts; pickled between the run's own
    processes). One process: ``[part]``."""
    if ctx is None or ctx.world_size == 1:
        return [part]
    parts: list[T] = [part] * ctx.world_size
    torch.distributed.all_gather_object(parts, part)
    return parts
