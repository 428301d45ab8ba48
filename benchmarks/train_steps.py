"""Milliseconds per training step of each task of a recipe (forward, backward, clipping, AdamW, schedule),
with the engine's sparse word-table gradients and with dense ones. Runs on the recipe's data
(`uniperceiver prepare-data toyworld --out data/toyworld` first for the ToyWorld recipes); the batches are
loaded before timing, so only the model's work is measured.

    python benchmarks/train_steps.py --recipe recipes/toyworld-tiny.yaml --steps 40
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

from uniperceiver_cli.data.loader import make_loader
from uniperceiver_cli.parallel.context import Context
from uniperceiver_cli.train.engines.single import SingleEngine
from uniperceiver_cli.train.loop import build_model
from uniperceiver_cli.train.recipe import load_recipe
from uniperceiver_cli.train.tasks import TrainTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/toyworld-tiny.yaml"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch compute threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    root = Path(recipe.data_root)
    image_size = build_model(recipe).config.image_size
    print(f"recipe={args.recipe} threads={args.threads} steps={args.steps} torch={torch.__version__}")
    print(f"{'task':<24}{'batch':>6}{'dense ms':>10}{'sparse ms':>11}{'speed-up':>10}")
    for spec in recipe.tasks:
        task = TrainTask.build(spec, root)
        loader = make_loader(task.directory, task=spec.type, batch_size=spec.batch_size, train=True,
                             image_size=image_size, num_frames=spec.num_frames,
                             max_text_len=spec.max_text_len, epochs=None, label_set=spec.label_set,
                             augment=spec.augment, frame_stride=spec.frame_stride, answers=task.answers)
        batches = list(itertools.islice(iter(loader), 4))
        times = {}
        for mode in ("dense", "sparse"):
            torch.manual_seed(0)
            engine = SingleEngine(build_model(recipe), recipe, Context())
            engine.model.text_embed.word.sparse = mode == "sparse"
            generator = torch.Generator().manual_seed(0)
            for i in range(args.steps + 3):  # 3 warm-up steps
                if i == 3:
                    start = time.perf_counter()
                engine.backward(task.loss(engine.model, batches[i % len(batches)], generator)[0])
                engine.step()
            times[mode] = (time.perf_counter() - start) / args.steps * 1000
        print(f"{spec.name:<24}{spec.batch_size:>6}{times['dense']:>10.1f}{times['sparse']:>11.1f}"
              f"{times['dense'] / times['sparse']:>9.2f}x")


if __name__ == "__main__":
    main()
