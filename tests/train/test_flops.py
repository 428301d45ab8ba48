"""The model FLOPs formula against FlopCounterMode (within 5% for every task family), the device peaks, and
flops_per_s in metrics.jsonl."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from uniperceiver_cli.train.flops import peak_flops
from uniperceiver_cli.train.loop import train
from uniperceiver_cli.train.recipe import validate

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
spec = importlib.util.spec_from_file_location("flops_check", BENCHMARKS / "flops_check.py")
flops_check = importlib.util.module_from_spec(spec)
sys.modules["flops_check"] = flops_check
spec.loader.exec_module(flops_check)


@pytest.mark.parametrize("model", ["tiny", "tiny-moe attribute", "tiny-moe token, capacity 1.25"])
def test_the_formula_is_within_5_percent_of_flop_counter_mode(toyworld_32: Path, model: str) -> None:
    for task in flops_check.sync_census.TASKS:
        if model != "tiny" and task == "caption (full vocabulary)":
            continue  # 49,411 rows through expert blocks (10-20 s); the corpus caption is the same formula
        formula, counted = flops_check.compare(toyworld_32, model, task)
        assert formula == pytest.approx(counted, rel=0.05), (model, task)


def test_dropless_token_routing_counts_a_lower_bound(toyworld_32: Path) -> None:
    formula, counted = flops_check.compare(toyworld_32, "tiny-moe token", "image classification")
    assert formula < counted  # the balanced depth; the busiest expert sets the real one


def test_device_peaks() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16", tf32=True) == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16", tf32=True) == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == 156e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32", tf32=False) == 19.5e12
    assert peak_flops("NVIDIA H200", "fp16", tf32=False) == 989e12
    assert peak_flops("NVIDIA GeForce RTX 4090", "bf16", tf32=True) is None


def test_metrics_record_the_model_flops_rate(toyworld_32: Path, tmp_path: Path) -> None:
    recipe = validate({"name": "t", "stage": "pretrain", "data_root": str(toyworld_32),
                       "tasks": [{"name": "shape", "type": "image_classification", "data": "images/train",
                                  "label_set": "shape", "batch_size": 4, "augment": False}],
                       "model": {"preset": "tiny", "overrides": {"image_size": 32, "layers": 1}},
                       "train": {"steps": 2, "log_every": 1}})
    train(recipe, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["flops_per_s"] > 0 for r in records)
    assert all("mfu" not in r and "max_memory_gib" not in r for r in records)  # on the CPU: no known peak
