"""What several test modules build: random lossless images, a small image split and a planted pickle."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from uniperceiver_cli.data.shards import Manifest, Sample, write_shards


def random_png(i: int) -> bytes:
    """A 32x32 PNG of random pixels seeded by ``i`` (lossless: it decodes to exactly these pixels)."""
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def image_split(directory: Path, count: int, min_shards: int = 2) -> Path:
    """A converted split of ``count`` random images labelled ``i % 3`` (red, green, blue) in ``min_shards`` shards."""
    manifest = Manifest(dataset="t", split="train", modality="image", tasks=["image_classification"], source="test",
                        classes=["red", "green", "blue"])
    samples = [Sample(f"s{i}", image=random_png(i), image_ext="png", label=i % 3) for i in range(count)]
    write_shards(directory, samples, lambda s: s, manifest=manifest, min_shards=min_shards, progress=False)
    return directory


class Planted:
    """A pickle that creates a file when it is unpickled with ``weights_only=False``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))
