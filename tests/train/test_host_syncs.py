"""The host-sync census (train/host_syncs.py) finds what makes a GPU wait, and a training step has none: every
task family on the tiny preset and tiny-moe (attribute routing, token routing with a capacity); dropless token
routing only its documented one per gate call (benchmarks/sync_census.py prints the table)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from uniperceiver_cli.data.loader import to_device
from uniperceiver_cli.train.host_syncs import HostSyncCensus

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
spec = importlib.util.spec_from_file_location("sync_census", BENCHMARKS / "sync_census.py")
sync_census = importlib.util.module_from_spec(spec)
sys.modules["sync_census"] = sync_census
spec.loader.exec_module(sync_census)
CPU = torch.device("cpu")


def test_the_census_counts_what_waits_for_the_device_and_nothing_on_the_host() -> None:
    weight = torch.randn(6)  # made before the census: on the device, as parameters are
    batch = torch.arange(6)
    with HostSyncCensus() as census:
        census.mark(batch, pinned=True)
        host = torch.arange(6)  # no device: host memory
        assert host.sum().item() == 15 and host.unique().numel() == 6 and host[host > 2].numel() == 3  # host only
        on_device = to_device(host, CPU) + batch.to(CPU, non_blocking=True)  # pinned copies: asynchronous
        assert not census.counts
        weight.sum().item()  # item 1
        weight[weight > 0]  # boolean indexing 1
        weight.nonzero()  # nonzero 1
        weight.unique()  # unique 1
        host.to(CPU)  # host-to-device copy 1: pageable memory
        batch.to(CPU)  # host-to-device copy 2: blocking
        torch.tensor([1.0, 2.0], device=CPU)  # host-to-device copy 3: from Python data
        weight + host  # a host tensor in a device operation 1
        weight.tolist()  # device-to-host copy 1
        on_device.cpu()  # device-to-host copy 2
    assert census.counts == {"item": 1, "boolean indexing": 1, "nonzero": 1, "unique": 1, "host-to-device copy": 3,
                             "host tensor in a device operation": 1, "device-to-host copy": 2}
    assert census.places["item @ outside the package"] == 1


@pytest.mark.parametrize("model", ["tiny", "tiny-moe attribute", "tiny-moe token, capacity 1.25"])
def test_a_training_step_makes_the_host_wait_for_nothing(toyworld_32: Path, model: str) -> None:
    for task in sync_census.TASKS:
        if "token" in model and task == "caption (full vocabulary)":
            continue  # 49,411 token-routed rows (20 s); the corpus caption runs the same code on fewer
        census = sync_census.step_census(toyworld_32, model, task)
        assert census.total == 0, f"{model}, {task}: {dict(census.places)}"


def test_dropless_token_routing_waits_once_per_gate_call(toyworld_32: Path) -> None:
    for task in ["image classification", "mlm (sampled)"]:
        census = sync_census.step_census(toyworld_32, "tiny-moe token", task)
        # one MoE layer (tiny-moe's layer 0 of 2), its attention and MLP gates, the input and the target set
        assert census.counts == {"item": 4}, dict(census.places)
        assert all("model/moe.py" in place and "item" in place for place in census.places)
