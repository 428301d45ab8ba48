"""``uniperceiver presets``: the model presets with their shapes and sizes."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from uniperceiver_cli.model.config import PRESETS, get_config
from uniperceiver_cli.model.uniperceiver import UniPerceiver


def presets() -> None:
    """List the model presets: width, depth, heads, MLP, experts and parameter count."""
    table = Table(title="Model presets")
    for column in ("preset", "width", "layers", "heads", "mlp", "experts", "parameters"):
        table.add_column(column, justify="left" if column == "preset" else "right")
    for name in PRESETS:
        config = get_config(name)
        with torch.device("meta"):  # count without allocating
            count = UniPerceiver(config).num_parameters()
        experts = f"{config.moe.num_experts} (top-{config.moe.top_k})" if config.moe else "-"
        table.add_row(name, str(config.width), str(config.layers), str(config.heads), str(config.mlp_dim),
                      experts, f"{count:,}")
    Console().print(table)
