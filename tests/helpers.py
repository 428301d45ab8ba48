"""What several test modules build: random lossless images and a planted pickle."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def random_png(i: int) -> bytes:
    """A 32x32 PNG of random pixels seeded by ``i`` (lossless: it decodes to exactly these pixels)."""
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


class Planted:
    """A pickle that creates a file when it is unpickled with ``weights_only=False``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))
