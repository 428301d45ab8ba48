"""Multi-task mixing: each step draws one task by its sampling weight and yields a batch of that task.

This is the reference's ``WeightedBatchSampler`` scheme (``random.choices(tasks, weights)`` per step). Which
processes draw the same task is the caller's choice through ``rank``:

- ``rank=None``: every process seeded alike draws the same task sequence, so all processes of a step run the
  same task. Needed when the task decides collective communication, e.g. expert-parallel groups (the
  reference broadcast the task inside such groups).
- ``rank=r``: the stream is seeded with ``(seed, r)``, so each process draws on its own, as the reference's
  data-parallel pretraining did (seed + rank); gradients then average over different tasks.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator, Mapping
from typing import Any

import torch


def mix_tasks(loaders: Mapping[str, Iterable[Any]], weights: Mapping[str, float], *, seed: int = 0,
              rank: int | None = None, skip: int = 0) -> Generator[tuple[str, Any], None, str]:
    """Yield ``(task name, batch)`` with the task drawn by weight at every step.

    A loader's iterator is started on its task's first draw. Pass infinite loaders (``epochs=None``) for
    training; the mix ends when a drawn task's loader is exhausted, with that task's name as the generator's
    return value (``StopIteration.value``). A task of weight 0 is never drawn.

    Args:
        loaders: task name -> iterable of batches.
        weights: task name -> sampling weight (>= 0, one at least > 0); normalised to probabilities.
        seed: seed of the task draws.
        rank: None for the same draws on every process, or this process's rank for independent draws.
        skip: draws to pass over first, drawing no batch (a resumed run whose loaders went on by themselves).

    Yields:
        The drawn task's name and its next batch.

    Raises:
        ValueError: if the names of ``loaders`` and ``weights`` differ, a weight is negative or none is positive.
    """
    if set(loaders) != set(weights):
        raise ValueError(f"loaders {sorted(loaders)} and weights {sorted(weights)} name different tasks")
    if not any(w > 0 for w in weights.values()) or any(not w >= 0 for w in weights.values()):
        raise ValueError(f"sampling weights must be >= 0 and one at least positive, got {dict(weights)}")
    names = list(loaders)
    probabilities = torch.tensor([float(weights[name]) for name in names], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed if rank is None else hash((seed, rank)) % 2**63)
    iterators: dict[str, Iterator[Any]] = {}
    for _ in range(skip):
        torch.multinomial(probabilities, 1, generator=generator)
    while True:
        name = names[int(torch.multinomial(probabilities, 1, generator=generator))]
        if name not in iterators:
            iterators[name] = iter(loaders[name])
        try:
            batch = next(iterators[name])
        except StopIteration:
            return name
        yield name, batch
