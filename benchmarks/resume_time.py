"""Seconds from ``--resume auto`` to the first step for a run of ``toyworld-tiny`` whose checkpoint has consumed
``--consumed`` batches (100,000 by default), against replaying the data as earlier versions did (every consumed
batch drawn and decoded again), which is timed on ``--replay`` batches and scaled.

The checkpoint is a real one (2 steps), with its loop state moved on: the step and the micro-batches consumed
set to ``--consumed``, and each task's loader position (epoch, samples into it) to the batches the task draws
would have given it (no skipped samples). Needs the ToyWorld data
(``uniperceiver prepare-data toyworld --out data/toyworld``).

    python benchmarks/resume_time.py --consumed 100000
"""

from __future__ import annotations

import argparse
import itertools
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from uniperceiver_cli.checkpoints.runs import RNG_DIR, STATE_FILE, rng_file, step_folders
from uniperceiver_cli.data.mixing import mix_tasks
from uniperceiver_cli.data.shards import Manifest
from uniperceiver_cli.train import loop
from uniperceiver_cli.train.catalogue import load_checked
from uniperceiver_cli.train.engines.single import load_state_file
from uniperceiver_cli.train.tasks import TrainTask


class FirstStep(Exception):
    """Raised at the first loss of the resumed run: what is timed ends there."""


def forge(run: Path, consumed: int, recipe) -> None:  # noqa: ANN001
    """Move the run's last checkpoint on to ``consumed`` micro-batches."""
    folder = step_folders(run)[-1]
    state = load_state_file(folder / STATE_FILE)
    state.update(step=consumed, consumed=consumed)
    torch.save(state, folder / STATE_FILE)
    process = load_state_file(folder / RNG_DIR / rng_file(0))
    draws = mix_tasks({t.name: itertools.repeat(None) for t in recipe.tasks},
                      {t.name: t.sampling_weight for t in recipe.tasks}, seed=recipe.train.seed)
    counts = Counter(name for name, _ in itertools.islice(draws, consumed))
    for task in recipe.tasks:
        data = process["data"][task.name]
        known = next(iter(data["positions"].values()), {"rng": random.Random(task.name).getstate()})
        per_epoch = Manifest.load(Path(recipe.data_root) / task.data).num_samples  # one process, no worker
        epoch, in_epoch = divmod(counts[task.name] * task.batch_size, per_epoch)
        data.update(batches=counts[task.name], positions={0: {**known, "worker": 0, "epoch": epoch,
                                                               "in_epoch": in_epoch}})
    torch.save(process, folder / RNG_DIR / rng_file(0))


def time_to_first_step(recipe, run: Path) -> float:  # noqa: ANN001
    real = TrainTask.loss

    def first(self, model, batch, generator=None):  # noqa: ANN001, ANN202
        raise FirstStep

    TrainTask.loss = first
    start = time.perf_counter()
    try:
        loop.train(recipe, run, resume="auto")
    except FirstStep:
        pass
    finally:
        TrainTask.loss = real
    return time.perf_counter() - start


def replay_per_batch(recipe, batches: int) -> float:  # noqa: ANN001
    """Seconds per micro-batch drawn and decoded (the replay of earlier versions), one process."""
    ctx = loop.Context()
    run = loop._setup(recipe, Path(tempfile.mkdtemp()), None, ctx)
    start = time.perf_counter()
    for _ in range(batches):
        loop._draw(run)
    return (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--consumed", type=int, default=100_000)
    parser.add_argument("--replay", type=int, default=200, help="batches to time the replay on")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        short = load_checked("toyworld-tiny", ["train.steps=2", "train.checkpoint_every=2", "evaluation.tasks=[]",
                                               "train.num_workers=0"])
        loop.train(short, run, stop_after=2)
        recipe = load_checked("toyworld-tiny", [f"train.steps={args.consumed + 1}", "evaluation.tasks=[]",
                                                "train.num_workers=0"])
        forge(run, args.consumed, recipe)
        seconds = time_to_first_step(recipe, run)
        per_batch = replay_per_batch(recipe, args.replay)
    print(f"toyworld-tiny, {args.consumed:,} consumed batches, one process, train.num_workers=0")
    print(f"{'resume':<40}{'seconds to the first step':>28}")
    print(f"{'pass over (tar headers, no decoding)':<40}{seconds:>28.1f}")
    print(f"{'replay (decode again), scaled':<40}{per_batch * args.consumed:>28.0f}")


if __name__ == "__main__":
    main()
