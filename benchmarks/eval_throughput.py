"""Evaluation throughput: zero-shot classification images/s, and beam-search captions/s with and without
the key/value cache (checking both give identical tokens).

Random weights and a random vocabulary feature table: the cost does not depend on their values.

    python benchmarks/eval_throughput.py --preset base --batch 4 --device cpu
"""

from __future__ import annotations

import argparse
import time

import torch

import uniperceiver_cli as up
from uniperceiver_cli.model.decoding import beam_search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--beam", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=21)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = up.create_model(args.preset).eval().to(device, dtype)
    size = model.config.image_size
    images = torch.randn(args.batch, 3, size, size, device=device, dtype=dtype)
    vocabulary = torch.nn.functional.normalize(
        torch.randn(model.config.vocab_size, model.config.width, device=device, dtype=dtype), dim=-1)
    # An end token no beam picks, so every run decodes the full length.
    eos = model.config.vocab_size - 1
    vocabulary[eos] = 0

    labels = [f"class {i}" for i in range(1000)]
    with torch.inference_mode():
        targets = model.encode_text(labels)  # encoded once per evaluation, as the runners do
        model.classify(images, targets)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        repeats = 3
        for _ in range(repeats):
            model.classify(images, targets)
        if device.type == "cuda":
            torch.cuda.synchronize()
        classify_rate = repeats * args.batch / (time.perf_counter() - start)

    rows, outputs = [], {}
    for use_cache in (False, True):
        kwargs = {"beam_size": args.beam, "max_len": args.max_len, "vocabulary": vocabulary, "eos_id": eos,
                  "use_cache": use_cache}
        beam_search(model, images, **{**kwargs, "max_len": 2})  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs[use_cache] = beam_search(model, images, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append((use_cache, time.perf_counter() - start))
    same = torch.equal(outputs[True].tokens, outputs[False].tokens)
    steps = outputs[True].tokens.shape[1]
    print(f"preset={args.preset} device={device} dtype={args.dtype} batch={args.batch} beam={args.beam} "
          f"steps={steps} torch={torch.__version__}")
    print(f"{'mode':<22}{'seconds':>10}{'captions/s':>12}{'speed-up':>10}")
    base = rows[0][1]
    for use_cache, seconds in rows:
        mode = "kv cache" if use_cache else "re-encode each step"
        print(f"{mode:<22}{seconds:>10.2f}{args.batch / seconds:>12.2f}{base / seconds:>9.1f}x")
    print(f"identical tokens: {same}")
    print(f"zero-shot classification (1000 classes, features cached): {classify_rate:.1f} images/s")


if __name__ == "__main__":
    main()
