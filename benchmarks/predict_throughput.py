"""``uniperceiver predict``'s loop, files/s at batch 1 and 16, on PyTorch and on onnxruntime.

For each preset a randomly initialised model (speed does not depend on the weights) is written as a bundle and
exported with ONNX graphs into a temporary folder. The timed part is what ``predict`` does after loading the
model: read each JPEG (decode, resize, crop, normalise), stack a batch, score it against 100 class names encoded
beforehand, and build each file's top-5 answer (``cli/predict.py``'s ``_batches`` and ``_answer_batch`` with the
runtime's answerer). ``--files`` JPEGs of 320x240, the median of ``--repeats`` passes after a warm-up pass, torch
and onnxruntime on the same threads.

    python benchmarks/predict_throughput.py                       # tiny and small, 64 files
    python benchmarks/predict_throughput.py --presets base --files 32
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from uniperceiver_cli.checkpoints.bundle import save_bundle
from uniperceiver_cli.checkpoints.loading import load_model
from uniperceiver_cli.cli.predict import _answer_batch, _batches
from uniperceiver_cli.export import export
from uniperceiver_cli.model.config import get_config
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.predict import onnx_answerer, torch_answerer

CLASSES = [f"class number {i}" for i in range(100)]


def _files(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _files_per_s(answer, read, paths: list[Path], batch: int, repeats: int) -> float:  # noqa: ANN001
    def one_pass() -> float:
        start = time.perf_counter()
        for group in _batches(iter(paths), batch):
            rows = _answer_batch(group, answer, read, num_frames=8, top_k=5)
            assert all("top" in row for row in rows)
        return time.perf_counter() - start

    one_pass()  # warm-up
    return len(paths) / statistics.median(one_pass() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"{platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}", flush=True)
    print("| preset | batch | runtime | files/s | vs batch 1 |\n|---|---:|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        paths = _files(Path(tmp), args.files)
        for preset in args.presets:
            torch.manual_seed(0)
            save_bundle(UniPerceiver(get_config(preset)).eval(), Path(tmp) / preset)
            export(Path(tmp) / preset, Path(tmp) / f"{preset}-out", onnx=True)
            net = load_model(Path(tmp) / preset)
            runtimes = {
                "pytorch": torch_answerer(net, torch.device("cpu"), CLASSES, None, [], "trained", 2, 21, None),
                "onnxruntime": onnx_answerer(Path(tmp) / f"{preset}-out" / "onnx", CLASSES, None, [], "trained", 2,
                                             21),
            }
            for name, (answer, read) in runtimes.items():
                first = None
                for batch in (1, 16):
                    rate = _files_per_s(answer, read, paths, batch, args.repeats)
                    first = first or rate
                    print(f"| {preset} | {batch} | {name} | {rate:.1f} | {rate / first:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
