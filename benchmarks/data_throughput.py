"""Data-loading throughput of one worker: images and videos, training and evaluation transforms.

Every row is the fastest of ``--repeats`` full passes in this process with ``num_workers=0`` and one torch
thread (what a DataLoader worker gets), so samples/s is the rate of one worker: multiply by workers per GPU.
The baseline is timm's own recipe on the same image bytes without the loader: PIL decode + the timm training
transform.

By default it writes its own shards in a temporary folder: JPEG photos-like images (smooth gradients, shapes
and noise, 500 x 375, quality 90) and mp4 clips (320 x 240, 30 fps, one shard folder per clip length).

    python benchmarks/data_throughput.py                       # generated data
    python benchmarks/data_throughput.py --shards DIR --video-shards DIR
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import random
import tarfile
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import av
import numpy as np
import PIL
import timm
import torch
from PIL import Image, ImageDraw

from uniperceiver_cli.data.loader import make_loader
from uniperceiver_cli.data.shards import Manifest, Sample, write_shards
from uniperceiver_cli.data.transforms import classification_train_transform
from uniperceiver_cli.model.tokenizer import get_tokenizer


def photo_jpeg(seed: int, width: int = 500, height: int = 375) -> bytes:
    """A JPEG that decodes like a photo: smooth colour gradients, a few shapes, sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [rng.uniform(40, 200) + rng.uniform(-60, 60) * np.sin(x / rng.uniform(60, 300) + rng.uniform(0, 6))
                + rng.uniform(-60, 60) * np.cos(y / rng.uniform(60, 300)) for _ in range(3)]
    image = Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 60))
        box = (x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 150)))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    pixels = np.asarray(image, np.float32) + rng.normal(0, 6, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def clip_mp4(seed: int, frames: int, width: int = 320, height: int = 240) -> bytes:
    """An H.264 clip of a textured background panning under a moving disc."""
    rng = np.random.default_rng(seed)
    background = np.asarray(Image.open(io.BytesIO(photo_jpeg(seed, width + frames, height))))
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        cx, cy = rng.uniform(40, width - 40), rng.uniform(40, height - 40)
        for t in range(frames):
            frame = Image.fromarray(np.ascontiguousarray(background[:, t : t + width]))
            x, y = (cx + 3 * t) % width, cy
            ImageDraw.Draw(frame).ellipse((x - 25, y - 25, x + 25, y + 25), fill=(220, 40, 40))
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())
    return out.getvalue()


def write_folder(directory: Path, samples: list[Sample], modality: str) -> Path:
    manifest = Manifest(dataset="bench", split="train", modality=modality, tasks=[], source="generated")
    write_shards(directory, samples, lambda sample: sample, manifest=manifest, progress=False)
    return directory


def image_bytes(directory: Path) -> list[bytes]:
    """Every image member of the folder's shards, read into memory."""
    out = []
    for path in sorted(directory.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith((".jpg", ".png"))]
    return out


def rate(run: Callable[[], int], repeats: int) -> float:
    """Samples/s of the fastest of ``repeats`` whole passes (the least disturbed by other processes)."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        samples = run()
        best = max(best, samples / (time.perf_counter() - start))
    return best


def loader_pass(source: Path, **kwargs: object) -> Callable[[], int]:
    def run() -> int:
        loader = make_loader(source, batch_size=32, num_workers=0, **kwargs)
        done = sum(len(batch["keys"]) for batch in loader)
        if loader.skipped:
            raise RuntimeError(f"benchmark data had skips: {dict(loader.skipped)}")
        return done

    return run


def timm_baseline(data: list[bytes], size: int) -> Callable[[], int]:
    transform = classification_train_transform(size)

    def run() -> int:
        for item in data:
            with Image.open(io.BytesIO(item)) as image:
                transform(image.convert("RGB"))
        return len(data)

    return run


def decode_only(data: list[bytes]) -> Callable[[], int]:
    def run() -> int:
        for item in data:
            with Image.open(io.BytesIO(item)) as image:
                image.convert("RGB")
        return len(data)

    return run


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, help="an image shard folder (default: generate JPEGs)")
    parser.add_argument("--video-shards", type=Path, nargs="*", help="video shard folders (default: generate)")
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--num-videos", type=int, default=32)
    parser.add_argument("--clip-frames", type=int, nargs="+", default=[8, 300],
                        help="lengths of the generated clips; 300 = a 10 s Kinetics-like clip")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--frames", type=int, default=8, help="frames sampled per clip, T")
    parser.add_argument("--repeats", type=int, default=3, help="passes per row; the fastest counts")
    parser.add_argument("--gpu-rate", type=float, default=2500.0, help="training images/s one GPU consumes")
    args = parser.parse_args()

    torch.set_num_threads(1)  # what each DataLoader worker runs with
    random.seed(0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        captioned = [Sample(f"{i:06d}", image=photo_jpeg(i), label=i % 10, text=f"a photo of thing {i} on a table")
                     for i in range(args.num_images)]
        images = args.shards or write_folder(root / "images", captioned, "image")
        video_sets = [(path, path.name) for path in args.video_shards or []]
        if args.video_shards is None:
            for frames in args.clip_frames:
                samples = [Sample(f"{i:06d}", video=clip_mp4(i, frames), label=i % 10) for i in range(args.num_videos)]
                video_sets.append((write_folder(root / f"videos{frames}", samples, "video"), f"{frames}-frame clips"))

        data = image_bytes(images)
        measure = partial(rate, repeats=args.repeats)
        get_tokenizer()  # built once per worker; not part of the steady rate
        common = {"image_size": args.size}
        train_rate = measure(loader_pass(images, task="image_classification", train=True, **common))
        rows = [
            ("images", "PIL decode only (no transform)", measure(decode_only(data))),
            ("images", "timm baseline: PIL decode + timm train transform, no loader",
             measure(timm_baseline(data, args.size))),
            ("images", "loader, classification train (RandAugment, erasing)", train_rate),
            ("images", "loader, classification eval (resize, centre crop)",
             measure(loader_pass(images, task="image_classification", train=False, **common))),
        ]
        if args.shards is None:  # the generated images have captions
            rows.append(("images", "loader, caption train (resize, random crop, flip, tokenise)",
                         measure(loader_pass(images, task="image_caption", train=True, **common))))
        for source, name in video_sets:
            video = {"task": "video_classification", "num_frames": args.frames, **common}
            rows += [
                ("videos", f"loader, train, T={args.frames}, {name}",
                 measure(loader_pass(source, train=True, **video))),
                ("videos", f"loader, eval 3 crops, T={args.frames}, {name}",
                 measure(loader_pass(source, train=False, num_views=3, **video))),
            ]

    print(f"machine: {cpu_name()} ({os.cpu_count()} cores), {torch.get_num_threads()} torch thread, "
          f"torch {torch.__version__}, timm {timm.__version__}, Pillow {PIL.__version__}; S={args.size}")
    print()
    print(f"| data | pipeline (one worker, best of {args.repeats} whole passes) | samples/s | ms/sample |")
    print("|---|---|---:|---:|")
    for kind, name, value in rows:
        print(f"| {kind} | {name} | {value:,.1f} | {1000 / value:.1f} |")
    print()
    print(f"Workers (cores) to feed one GPU training at {args.gpu_rate:,.0f} images/s with the classification train "
          f"transform: {math.ceil(args.gpu_rate / train_rate)} ({args.gpu_rate:,.0f} / {train_rate:,.1f}).")


if __name__ == "__main__":
    main()
