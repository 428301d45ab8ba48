"""``uniperceiver evaluate --suite`` on one process against two under torchrun: wall time and metrics.

The suite is the ToyWorld image tasks of ``recipes/toyworld-tiny.yaml`` (shape and colour classification, image-text
retrieval, image captioning over the 1,000 test images of ``data/toyworld``, ``make demo``'s data), evaluated with
the recipe's model, randomly initialised (evaluation costs what a trained model's does; the captions of an untrained
model run every decoding step). Each run is a fresh command, so the wall time includes starting Python and loading the
model; the two-process run also starts torch.distributed. One process uses all the machine's threads, each of the
two processes half of them.

    python benchmarks/eval_processes.py            # after make demo (or uniperceiver prepare-data toyworld)
"""

from __future__ import annotations

import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from uniperceiver_cli.checkpoints.bundle import save_bundle
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.train.catalogue import load_checked

REPO = Path(__file__).resolve().parents[1]


def _run(command: list[str], threads: int) -> float:
    start = time.perf_counter()
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    recipe = load_checked("toyworld-tiny")
    cores = os.cpu_count() or 1
    print(f"{platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        save_bundle(UniPerceiver(recipe.model_config()).eval(), folder / "bundle")
        tasks = [{k: v for k, v in vars(t).items() if v is not None} for t in recipe.evaluation.tasks
                 if t.type.startswith("image")]
        (folder / "suite.yaml").write_text(yaml.safe_dump({"data_root": str(REPO / recipe.data_root),
                                                           "tasks": tasks}))
        command = ["-m", "uniperceiver_cli", "evaluate", "--suite", str(folder / "suite.yaml"), "--model",
                   str(folder / "bundle"), "--device", "cpu"]
        one = _run([sys.executable, *command, "--out", str(folder / "one")], cores)
        two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command,
                    "--out", str(folder / "two")], max(cores // 2, 1))
        rows = {}
        for name in ("one", "two"):
            with (folder / name / "summary.csv").open() as f:
                rows[name] = [(r["task"], r["metric"], float(r["value"])) for r in csv.DictReader(f)]
        same = all(a[:2] == b[:2] and abs(a[2] - b[2]) < 1e-6 for a, b in zip(rows["one"], rows["two"], strict=True))
        print(f"tasks: {', '.join(t['name'] for t in tasks)}")
        print(f"| processes | wall s | speed-up |\n|---:|---:|---:|\n| 1 | {one:.1f} | 1.00x |\n| 2 | {two:.1f} | "
              f"{one / two:.2f}x |")
        print(f"metrics equal (to 1e-6): {same}")
        for a, b in zip(rows["one"], rows["two"], strict=True):
            print(f"  {a[0]} {a[1]}: {a[2]:.4f} vs {b[2]:.4f}")


if __name__ == "__main__":
    main()
