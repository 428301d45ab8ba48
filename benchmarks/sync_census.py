"""Host syncs of one training micro-step per task family, counted on the CPU (uniperceiver_cli/train/host_syncs.py).

For the tiny preset and tiny-moe with attribute and token routing (dropless, and with a capacity), each task
family of ToyWorld runs one step outside the census (lazy set-up: optimizer state, caches) and one inside:
forward, loss, backward and the optimizer step, as the training loop runs them (``micro_step``,
``optimizer_step``), without logging or checkpointing. Prints the counts and where each happened.

    python benchmarks/sync_census.py [--places]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from uniperceiver_cli.data.loader import make_loader
from uniperceiver_cli.data.toyworld import generate
from uniperceiver_cli.parallel.context import Context
from uniperceiver_cli.train.engines.single import SingleEngine
from uniperceiver_cli.train.host_syncs import HostSyncCensus
from uniperceiver_cli.train.loop import build_model, micro_step, optimizer_step
from uniperceiver_cli.train.recipe import TrainSpec, validate
from uniperceiver_cli.train.run_log import Window
from uniperceiver_cli.train.tasks import TrainTask

TASKS = {
    "image classification": {"type": "image_classification", "data": "images/train", "label_set": "shape",
                             "batch_size": 4, "augment": False},
    "video classification": {"type": "video_classification", "data": "videos/train", "label_set": "motion",
                             "batch_size": 2, "num_frames": 2, "frame_stride": 3.75, "augment": False},
    "caption (full vocabulary)": {"type": "image_caption", "data": "images/train", "batch_size": 2,
                                  "vocabulary": "full", "augment": False},
    "caption (corpus)": {"type": "image_caption", "data": "images/train", "batch_size": 2, "vocabulary": "corpus",
                         "augment": False},
    "retrieval": {"type": "image_retrieval", "data": "images/train", "batch_size": 4, "augment": False},
    "mlm (sampled)": {"type": "text_mlm", "data": "text/train", "batch_size": 2, "max_text_len": 32,
                      "vocabulary": "sampled", "negatives": 64},
    "text classification": {"type": "text_classification", "data": "sentences/train", "batch_size": 4,
                            "max_text_len": 40},
    "vqa": {"type": "vqa", "data": "questions/train", "batch_size": 4, "max_text_len": 23, "augment": False},
}
CPU = torch.device("cpu")
MODELS = {
    "tiny": {"preset": "tiny"},
    "tiny-moe attribute": {"preset": "tiny-moe", "moe": {"routing": "attribute"}},
    "tiny-moe token": {"preset": "tiny-moe", "moe": {"routing": "token"}},
    "tiny-moe token, capacity 1.25": {"preset": "tiny-moe", "moe": {"routing": "token", "capacity_factor": 1.25}},
}


@dataclass
class Step:
    """A one-task training set-up on ToyWorld: :meth:`run` takes a training step as the loop does."""

    engine: SingleEngine
    task: TrainTask
    batches: Iterator[dict]
    spec: TrainSpec
    device: torch.device = CPU
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(1))
    window: Window = field(default_factory=lambda: Window(check_norms=True))

    def run(self, step: int, batch: dict | None = None) -> None:
        batch = batch if batch is not None else next(self.batches)
        micro_step(self.engine, self.task, batch, self.window, step, self.generator, self.spec, self.device)
        optimizer_step(self.engine, self.window, step, self.device)


def setup_step(root: Path, model: str, task: str, device: torch.device = CPU) -> Step:
    """``task`` (a key of :data:`TASKS`) on ``model`` (a key of :data:`MODELS`), ToyWorld at ``root``, on
    ``device``."""
    preset = dict(MODELS[model])
    overrides = {"image_size": 32, "layers": 2, "max_frames": 2}
    if "moe" in preset:
        overrides["moe"] = preset.pop("moe")
    recipe = validate({"name": "census", "stage": "pretrain", "data_root": str(root),
                       "tasks": [{"name": "t", **TASKS[task]}],
                       "model": {**preset, "overrides": overrides},
                       "train": {"steps": 2, "lr": 1e-3, "warmup_steps": 1, "grad_clip": 1.0, "num_workers": 0}})
    torch.manual_seed(0)
    engine = SingleEngine(build_model(recipe), recipe, Context(device=device))
    engine.model.train()
    spec = recipe.tasks[0]
    train_task = TrainTask.build(spec, root)
    loader = make_loader(train_task.directory, task=spec.type, batch_size=spec.batch_size, train=True,
                         image_size=32, num_frames=spec.num_frames, max_text_len=spec.max_text_len,
                         label_set=spec.label_set, augment=False, frame_stride=spec.frame_stride, epochs=None,
                         pin_memory=device.type == "cuda", answers=train_task.answers)
    return Step(engine, train_task, iter(loader), recipe.train, device)


def step_census(root: Path, model: str, task: str) -> HostSyncCensus:
    """The census of one step of ``task`` on ``model``, after a first step that sets up (optimizer state,
    caches), which the census follows without counting."""
    setup = setup_step(root, model, task)
    census = HostSyncCensus()
    with census:
        for step in (1, 2):
            batch = next(setup.batches)
            for value in batch.values():
                if isinstance(value, torch.Tensor):
                    census.mark(value, pinned=True)  # the loader pins its batches on a GPU run
            census.counting = step == 2
            setup.run(step, batch)
    return census


def census_table(root: Path, places: bool = False) -> tuple[str, int]:
    """The markdown table of every model x task census and its total."""
    lines = ["| model | task | host syncs | kinds |", "|---|---|---:|---|"]
    total = 0
    for model in MODELS:
        for task in TASKS:
            census = step_census(root, model, task)
            total += census.total
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(census.counts.items())) or "-"
            lines.append(f"| {model} | {task} | {census.total} | {kinds} |")
            if places:
                lines += [f"|  |  |  | {n}x {place} |" for place, n in sorted(census.places.items())]
    return "\n".join(lines), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--places", action="store_true", help="list where each sync happened")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root, size="tiny", image_size=32, num_frames=2, min_shards=1, progress=False)
        table, total = census_table(root, args.places)
    print(table)
    print(f"\ntotal: {total}")


if __name__ == "__main__":
    main()
