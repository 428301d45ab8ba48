"""MS-COCO captions: Karpathy's ``dataset_coco.json`` (train, restval -> train, val, test) or COCO-style
``captions_*.json`` files (one split each), with images at ``IMAGES/<filepath>/<filename>``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from uniperceiver_cli.data.sources import captions
from uniperceiver_cli.data.sources.common import Conversion, require


def plan(annotations: Sequence[Path], images: Path | None = None, *, splits: Sequence[str] | None = None,
         name: str = "coco") -> list[Conversion]:
    """One conversion per split, one sample per image with all its captions.

    Args:
        annotations: Karpathy and/or COCO-style caption jsons.
        images: the folder the image paths are relative to (default: the first json's folder).
        splits: only these splits (default: all found).
        name: the data set name in the manifests.
    """
    images = require(images or annotations[0].parent, "a folder of images")
    return captions.conversions(annotations, lambda rel: str(images / rel), splits=splits, name=name, video=False)
