"""Flickr30k captions: Karpathy's ``dataset_flickr30k.json`` with images at ``IMAGES/<filename>``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from uniperceiver_cli.data.sources import coco
from uniperceiver_cli.data.sources.common import Conversion


def plan(annotations: Path, images: Path | None = None, *, splits: Sequence[str] | None = None,
         name: str = "flickr30k") -> list[Conversion]:
    """One conversion per split (train, val, test), one sample per image with its captions; the sample
    id is the number in the file name.

    Args:
        annotations: ``dataset_flickr30k.json``.
        images: the folder holding the images (default: the json's folder).
        splits: only these splits (default: all found).
        name: the data set name in the manifests.
    """
    return coco.plan([annotations], images, splits=splits, name=name)  # the same Karpathy layout
