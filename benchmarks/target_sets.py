"""Captioning and MLM target sets: seconds per training step with the full vocabulary (the reference's
49,411 candidates encoded every step), the task corpus's tokens, or the batch's tokens plus sampled
negatives. Runs on ToyWorld (`uniperceiver prepare-data toyworld --out data/toyworld` first).

    python benchmarks/target_sets.py --data data/toyworld --preset tiny --steps 5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import uniperceiver_cli as up
from uniperceiver_cli.data.loader import make_loader
from uniperceiver_cli.train.recipe import TaskSpec
from uniperceiver_cli.train.tasks import TrainTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/toyworld"))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = up.create_model(args.preset, image_size=args.image_size).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    print(f"preset={args.preset} device={device} batch={args.batch} torch={torch.__version__}")
    print(f"{'task':<14}{'target set':<12}{'candidates':>11}{'s/step':>9}")
    for kind, folder in (("image_caption", "images/train"), ("text_mlm", "text/train")):
        loader = make_loader(args.data / folder, task=kind, batch_size=args.batch, train=True,
                             image_size=args.image_size, epochs=None, augment=False, max_text_len=64)
        batches = iter(loader)
        batch = next(batches)
        for mode in ("full", "corpus", "sampled"):
            spec = TaskSpec(name=kind, type=kind, data=folder, batch_size=args.batch, vocabulary=mode, negatives=1024)
            task = TrainTask.build(spec, args.data)
            generator = torch.Generator().manual_seed(0)
            task.loss(model, batch, generator)[0].backward()  # warm-up
            optimizer.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                loss, _ = task.loss(model, batch, generator)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / args.steps
            if mode == "full":
                count = str(model.config.vocab_size)
            elif mode == "corpus":
                count = str(len(task.vocab_ids))
            else:
                count = f"~{batch['text_ids'][~batch['text_padding']].unique().numel() + 1024}"
            print(f"{kind:<14}{mode:<12}{count:>11}{seconds:>9.3f}")


if __name__ == "__main__":
    main()
