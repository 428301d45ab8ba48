"""MSVD and MSRVTT: COCO-style caption jsons (``images`` are the videos) with the videos under one folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from uniperceiver_cli.data.sources import captions
from uniperceiver_cli.data.sources.common import Conversion, index_files, require

SUFFIXES = (".avi", ".mp4", ".webm", ".mkv", ".mov")  # tried in this order for a file_name without one


def plan(annotations: Sequence[Path], videos: Path | None = None, *, splits: Sequence[str] | None = None,
         name: str = "msvd") -> list[Conversion]:
    """One conversion per caption json (its split named from the file name, e.g.
    ``caption_msvd_train_cocostyle.json`` -> train), one sample per video with all its captions.

    Args:
        annotations: COCO-style jsons: ``images`` = [{id, file_name}], ``annotations`` = [{image_id, caption}].
        videos: the folder ``file_name`` is relative to, with or without the video suffix (default: the first
            json's folder). A video not found is skipped as "missing file".
        splits: only these splits (default: all found).
        name: the data set name in the manifests (``msrvtt`` for MSRVTT).
    """
    index = index_files(require(videos or annotations[0].parent, "a folder of videos"), SUFFIXES)
    return captions.conversions(annotations, lambda rel: index.get(rel, ""), splits=splits, name=name, video=True)
