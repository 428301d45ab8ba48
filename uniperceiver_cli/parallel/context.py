"""Where a process runs: its rank, the world size and its device."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Context:
    """Where this process sits: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0
