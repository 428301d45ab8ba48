"""Eager against compiled encoder blocks (``train.compile``) on ToyWorld, one task at a time.

For each model and task family of benchmarks/sync_census.py, the same training steps run twice from the same
weights and data: eager, and with ``UniPerceiver.compile_blocks`` (Dynamo's caches reset first, so each task pays
its own compilation, as the first steps of a run do). Prints the graphs compiled, the graph breaks, the first
step's seconds (compilation included), the median of the other steps, and the largest relative difference of
the losses.

    python benchmarks/compile_check.py                         # tiny and tiny-moe attribute, inductor
    python benchmarks/compile_check.py --models tiny --steps 8 --backend aot_eager
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from uniperceiver_cli.data.toyworld import generate

_spec = importlib.util.spec_from_file_location("sync_census", Path(__file__).with_name("sync_census.py"))
sync_census = importlib.util.module_from_spec(_spec)
sys.modules["sync_census"] = sync_census
_spec.loader.exec_module(sync_census)


def timed_steps(setup: sync_census.Step, steps: int) -> tuple[list[float], list[float]]:
    """Seconds and task loss (not the router's) of each step."""
    seconds, losses = [], []
    for step in range(1, steps + 1):
        tic = time.perf_counter()
        setup.run(step)
        seconds.append(time.perf_counter() - tic)
        losses.append(next(loss for _, task, loss in reversed(setup.window.losses) if task != "router").item())
    return seconds, losses


def compare(root: Path, model: str, task: str, steps: int, backend: str) -> str:
    """One table row: eager and compiled steps of ``task`` on ``model``."""
    eager_seconds, eager_losses = timed_steps(sync_census.setup_step(root, model, task), steps)
    torch._dynamo.reset()
    counters.clear()
    compiled = sync_census.setup_step(root, model, task)
    compiled.engine.model.compile_blocks(backend)
    seconds, losses = timed_steps(compiled, steps)
    breaks = sum(counters["graph_break"].values())
    difference = max(abs(a - b) / abs(a) for a, b in zip(eager_losses, losses, strict=True))
    eager_ms, compiled_ms = statistics.median(eager_seconds[1:]) * 1e3, statistics.median(seconds[1:]) * 1e3
    return (f"| {model} | {task} | {counters['stats']['unique_graphs']} | {breaks} | {seconds[0]:.1f} | "
            f"{eager_ms:.1f} | {compiled_ms:.1f} | {eager_ms / compiled_ms:.2f}x | {difference:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "tiny-moe attribute"], choices=sync_census.MODELS)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root, size="tiny", image_size=32, num_frames=2, min_shards=1, progress=False)
        print("| model | task | graphs | graph breaks | first step s | eager ms | compiled ms | speed-up | "
              "loss rel. diff |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for model in args.models:
            for task in sync_census.TASKS:
                print(compare(root, model, task, args.steps, args.backend), flush=True)


if __name__ == "__main__":
    main()
