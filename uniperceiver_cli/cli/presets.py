"""``uniperceiver presets``: the model presets with their shapes and sizes."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from uniperceiver_cli.model.config import PRESETS, get_config


def presets() -> None:
    """List the model presets: width, depth, heads, MLP, experts and parameter count."""
    import torch  # imported here so that the other commands start without torch

    from uniperceiver_cli.model.uniperceiver import UniPerceiver

    table = Table(title="Model presets")
    for column in ("preset", "width", "layers", "heads", "mlp", "experts", "parameters"):
        # names and numbers: a cell broken over two lines would read as two values
        table.add_column(column, justify="left" if column == "preset" else "right", no_wrap=True)
    for name in PRESETS:
        config = get_config(name)
        with torch.device("meta"):  # count without allocating
            count = UniPerceiver(config).num_parameters()
        experts = f"{config.moe.num_experts} (top-{config.moe.top_k})" if config.moe else "-"
        table.add_row(name, str(config.width), str(config.layers), str(config.heads), str(config.mlp_dim),
                      experts, f"{count:,}")
    Console().print(table)
