"""Caption annotations shared by COCO, Flickr30k and MSVD/MSRVTT: Karpathy split jsons and COCO-style
caption jsons, read into entries (media path, id, captions), and the conversions built from them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from uniperceiver_cli.data.sources.common import (
    Conversion,
    Item,
    LayoutError,
    caption_conversion,
    clean_captions,
    load_json,
    media_name,
    select_splits,
    split_name,
)

KARPATHY = ("a Karpathy split json {'images': [{'filename', 'split', 'sentences': [{'raw'}], "
            "'filepath' and 'cocoid' for COCO}]}")
COCO_STYLE = ("a COCO-style caption json {'images': [{'id', 'file_name', optional 'file_path'}], "
              "'annotations': [{'image_id', 'caption'}]}")
LAYOUT = f"{KARPATHY}, or {COCO_STYLE}"
KARPATHY_SPLITS = {"restval": "train"}  # the reference folds restval into train


class Entry(NamedTuple):
    """One image or video with its captions."""

    rel: str  # the media path relative to the images/videos folder
    id: Any
    captions: tuple[str, ...]


def read(paths: Sequence[Path]) -> dict[str, list[Entry]]:
    """Split -> entries from Karpathy jsons (their ``split`` fields) and COCO-style jsons (one split each,
    named by :func:`split_name` from the file name)."""
    splits: dict[str, list[Entry]] = {}
    origin: dict[str, Path] = {}
    for path in paths:
        data = load_json(path, LAYOUT)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise LayoutError(f"{path} has no 'images' list; expected {LAYOUT}")
        try:
            found = {split_name(path): coco_style(data)} if "annotations" in data else karpathy(data)
        except (KeyError, TypeError, AttributeError) as e:
            kind = COCO_STYLE if "annotations" in data else KARPATHY
            raise LayoutError(f"{path}: missing or malformed field {e}; expected {kind}") from e
        for split, entries in found.items():
            if split in origin:
                raise ValueError(f"{origin[split]} and {path} both hold split {split!r}; convert them separately")
            origin[split], splits[split] = path, entries
    return splits


def karpathy(data: dict[str, Any]) -> dict[str, list[Entry]]:
    """Karpathy's ``dataset_{coco,flickr30k}.json``: ``filepath/filename`` (COCO) or ``filename``, the raw
    sentences, and as id the ``cocoid``, else the number in a Flickr30k file name, else ``imgid``."""
    splits: dict[str, list[Entry]] = {}
    for image in data["images"]:
        rel = "/".join(filter(None, (image.get("filepath"), image["filename"])))
        stem = PurePosixPath(image["filename"]).stem
        ident = image.get("cocoid", int(stem) if stem.isdigit() else image.get("imgid"))
        split = KARPATHY_SPLITS.get(image["split"], image["split"])
        splits.setdefault(split, []).append(Entry(rel, ident, clean_captions(s["raw"] for s in image["sentences"])))
    return splits


def coco_style(data: dict[str, Any]) -> list[Entry]:
    """A COCO-style caption json: one entry per image (``file_path/file_name`` or ``file_name``) in order."""
    captions: dict[Any, list[str]] = {}
    for annotation in data["annotations"]:
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    return [Entry("/".join(filter(None, (image.get("file_path"), image["file_name"]))), image["id"],
                  clean_captions(captions.get(image["id"], ()))) for image in data["images"]]


def conversions(paths: Sequence[Path], locate: Callable[[str], str], *, splits: Sequence[str] | None, name: str,
                video: bool) -> list[Conversion]:
    """One conversion per split of the annotation jsons ``paths`` (all, or ``splits``): a sample per image (or
    ``video``) with all its captions, its file at ``locate(rel)``."""
    entries = read(paths)
    source = ", ".join(str(p) for p in paths)
    out = []
    for split in select_splits(entries, splits, paths[0].parent):
        items = [Item(media_name(e.rel), locate(e.rel), captions=e.captions, meta={"id": e.id, "source": e.rel})
                 for e in entries[split]]
        out.append(caption_conversion(source, split, items, name, video=video))
    return out
