"""The memory plan (``uniperceiver recipes plan``) of every shipped recipe, and its check against real steps.

    python benchmarks/plan_check.py table      # every shipped recipe at the GPU count it names: markdown rows
    python benchmarks/plan_check.py check      # planned vs measured saved activations, toyworld-tiny, tiny + small

The check runs each task of ``toyworld-tiny`` (its data under data/toyworld when there: real class names and
corpora) once with the tiny preset and once with the small one: the real ``TrainTask`` loss on real CPU tensors,
the bytes autograd saves for the backward (:func:`uniperceiver_cli.train.plan.measure_step`) against the trace.
"""

from __future__ import annotations

import argparse
import time

from uniperceiver_cli.train.catalogue import load_checked, shipped_names
from uniperceiver_cli.train.plan import GIB, RecipePlan, measure_step, plan_recipe

MB = 2**20


def row(plan: RecipePlan, label: str, limit: float) -> str:
    s, big = plan.states, plan.largest
    fits = "yes" if plan.fits(limit * GIB) else "**no**"
    return (f"| {label} | {plan.gpus} | {plan.engine} {plan.zero_stage}, {plan.precision} | {s.parameters / 1e6:,.0f} M"
            f" | {s.total / GIB:.2f} | {big.name} ({big.batch_size}) | {big.peak / GIB:.2f} | {plan.total / GIB:.2f} |"
            f" {fits} | {plan.host / GIB:.1f} |")


def table(limit: float) -> None:
    print("| recipe | GPUs | engine, precision | parameters | model states GiB | largest task (batch) | its step GiB |"
          " peak GiB | fits 80 GiB | loader host GiB |\n|---|---:|---|---:|---:|---|---:|---:|---|---:|")
    for name in shipped_names():
        start = time.perf_counter()
        print(row(plan_recipe(load_checked(name)), name, limit), flush=True)
        if name in ("base-pretrain-stage1", "large-pretrain-stage1"):
            print(row(plan_recipe(load_checked(name, ["train.split_targets=0"])), f"{name}, split_targets=0", limit))
        print(f"<!-- {name}: {time.perf_counter() - start:.1f} s -->", flush=True)


def check() -> None:
    print("| preset | task | batch | planned MB | measured MB | planned / measured |\n|---|---|---:|---:|---:|---:|")
    for preset in ("tiny", "small"):
        recipe = load_checked("toyworld-tiny", [f"model.preset={preset}"])
        plan = plan_recipe(recipe)
        for i, task in enumerate(plan.tasks):
            measured = measure_step(recipe, i)["activations"]
            print(f"| {preset} | {task.name} | {task.batch_size} | {task.activations / MB:,.1f} | "
                  f"{measured / MB:,.1f} | {task.activations / measured:.4f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["table", "check"])
    parser.add_argument("--gpu-memory", type=float, default=80.0)
    args = parser.parse_args()
    table(args.gpu_memory) if args.what == "table" else check()


if __name__ == "__main__":
    main()
