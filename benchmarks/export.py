"""PyTorch eager against onnxruntime on the CPU: zero-shot classification images/s and captions/s.

For each preset a randomly initialised model (speed does not depend on the weights) is exported with
``uniperceiver_cli.export.export(..., onnx=True)`` into a temporary folder, and then timed:

- classification: a batch of preprocessed images -> features -> logits against 100 class features encoded
  beforehand (as ``predict`` and ``evaluate`` cache them): ``model.classification_logits`` against
  ``OnnxModel.classification_logits``;
- captioning: cached beam search, beam 2, 21 steps (random weights rarely emit <|endoftext|>, so both run
  every step), over a 1,000-token caption target set (the whole 49,411-token set costs the same per step
  beyond its larger logits matmul, and encoding it at export would dominate the run): ``beam_search`` against
  ``OnnxModel.caption_tokens``. The share of equal tokens is printed: an untrained model's caption logits are
  nearly tied, so float noise can pick another word (tests/test_onnx.py checks equality on trained-like
  weights, the reference fixtures).

MoE presets are timed three ways: PyTorch with the experts (merged at every call), PyTorch folded
(``--fold-experts``), and onnxruntime (whose graphs are always the dense view of one attribute row).
Each figure is the median of ``--repeats`` runs after one warm-up, torch and onnxruntime on the same number
of threads.

    python benchmarks/export.py                                  # tiny, tiny-moe, base
    python benchmarks/export.py --presets tiny base base-moe --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from uniperceiver_cli.checkpoints.bundle import save_bundle
from uniperceiver_cli.export import export
from uniperceiver_cli.model.config import get_config
from uniperceiver_cli.model.decoding import beam_search
from uniperceiver_cli.model.folding import fold_experts
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.onnx.runtime import OnnxModel

CLASSES = 100
CAPTION_TOKENS = 1000


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def caption_torch(model: UniPerceiver, images: torch.Tensor, vocab: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return beam_search(model, images, beam_size=2, max_len=21, vocabulary=vocab, token_ids=ids).tokens


def _rows(preset: str, batches: list[int], repeats: int, threads: int) -> list[tuple]:
    torch.manual_seed(0)
    model = UniPerceiver(get_config(preset)).eval()
    model.caption_vocabulary = torch.arange(1000, 1000 + CAPTION_TOKENS)
    with tempfile.TemporaryDirectory() as tmp:
        save_bundle(model, Path(tmp) / "src")
        start = time.perf_counter()
        export(Path(tmp) / "src", Path(tmp) / "out", onnx=True)
        export_s = time.perf_counter() - start
        runtime = OnnxModel(Path(tmp) / "out" / "onnx", threads=threads)
        eager = [("pytorch", model)]
        if model.config.moe is not None:
            eager.append(("pytorch folded", fold_experts(model).eval()))
        names = [f"class {i}" for i in range(CLASSES)]
        with torch.inference_mode():
            vocab, ids = model.caption_targets(model.caption_vocabulary)
        rows = []
        for batch in batches:
            images = torch.randn(batch, 3, model.config.image_size, model.config.image_size)
            array = images.numpy()
            for label, net in eager:
                with torch.inference_mode():
                    targets = net.encode_text(names)
                    classify = partial(net.classification_logits, images, targets)
                    caption = partial(beam_search, net, images, beam_size=2, max_len=21, vocabulary=vocab,
                                      token_ids=ids)
                    for task, fn in (("classify", classify), ("caption", caption)):
                        rows.append((preset, label, task, batch, batch / _median_seconds(fn, repeats)))
            classify = partial(runtime.classification_logits, array, runtime.label_features(names))
            caption = partial(runtime.caption_tokens, array, beam_size=2, max_len=21)
            for task, fn in (("classify", classify), ("caption", caption)):
                rows.append((preset, "onnxruntime", task, batch, batch / _median_seconds(fn, repeats)))
            with torch.inference_mode():
                want = caption_torch(model, images, vocab, ids).numpy()
            got = caption()
            same = float((got[:, :want.shape[1]] == want).mean()) if got.shape == want.shape else 0.0
            print(f"{preset} batch {batch}: {same:.0%} of the caption tokens equal PyTorch's", flush=True)
        print(f"{preset}: export with --onnx took {export_s:.1f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "tiny-moe", "base"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"{platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}", flush=True)
    table = []
    for preset in args.presets:
        table += _rows(preset, args.batches, args.repeats, threads)
    speed = {(p, label, task, b): v for p, label, task, b, v in table}
    print("\n| preset | task | batch | runtime | per s | vs PyTorch |\n|---|---|---:|---|---:|---:|")
    for preset, label, task, batch, value in table:
        base = speed[(preset, "pytorch", task, batch)]
        unit = "images" if task == "classify" else "captions"
        print(f"| {preset} | {task} | {batch} | {label} | {value:.1f} {unit} | {value / base:.2f}x |")


if __name__ == "__main__":
    main()
