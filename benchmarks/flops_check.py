"""The FLOPs formula (uniperceiver_cli/train/flops.py) against torch's FlopCounterMode, for one training step of
every task family of ToyWorld on tiny and tiny-moe (attribute routing; token routing dropless and with a
capacity), as benchmarks/sync_census.py sets them up. Prints formula / counted per step.

FlopCounterMode has no formula for the CPU's fused attention (``_scaled_dot_product_flash_attention_for_cpu``);
this script registers torch's own SDPA formulas for it, so attention counts as it does on CUDA.

    python benchmarks/flops_check.py
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from uniperceiver_cli.data.toyworld import generate
from uniperceiver_cli.train.flops import step_flops

aten = torch.ops.aten
_spec = importlib.util.spec_from_file_location("sync_census", Path(__file__).with_name("sync_census.py"))
sync_census = importlib.util.module_from_spec(_spec)
sys.modules["sync_census"] = sync_census
_spec.loader.exec_module(sync_census)


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
    return sdpa_flop_count(query, key, value)


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_attention_backward(grad, query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
    return sdpa_backward_flop_count(grad, query, key, value)


def compare(root: Path, model: str, task: str) -> tuple[int, int]:
    """(formula, counted) FLOPs of the second training step of ``task`` on ``model``."""
    setup = sync_census.setup_step(root, model, task)
    setup.run(1)
    with FlopCounterMode(display=False) as counter:
        setup.run(2)
    return step_flops(setup.engine.model.config, setup.task.shape), counter.get_total_flops()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root, size="tiny", image_size=32, num_frames=2, min_shards=1, progress=False)
        print("| model | task | formula GFLOPs | FlopCounterMode GFLOPs | formula / counted |")
        print("|---|---|---:|---:|---:|")
        for model in sync_census.MODELS:
            for task in sync_census.TASKS:
                formula, counted = compare(root, model, task)
                print(f"| {model} | {task} | {formula / 1e9:.3f} | {counted / 1e9:.3f} | {formula / counted:.3f} |")


if __name__ == "__main__":
    main()
