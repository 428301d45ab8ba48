"""Image-text pair lists (CC3M, CC12M, SBU, YFCC): TSV, JSON lines, or one JSON dict, with images in folders or
uncompressed zips (``train_image.zip@/00000000.jpg``)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

from uniperceiver_cli.data.shards import Manifest, Sample
from uniperceiver_cli.data.sources.common import (
    Conversion,
    Item,
    LayoutError,
    clean_captions,
    image_sample,
    media_name,
    require,
    unique_keys,
)
from uniperceiver_cli.task_types import task_names

LAYOUT = ("a .tsv of 'path<TAB>caption' lines (optional header), a .jsonl/.json of {\"image\": ..., \"caption\": ...} "
          "lines, or a .json dict {path: caption}")
PATH_COLUMNS = ("image", "path", "filepath", "file", "filename")
CAPTION_COLUMNS = ("caption", "text")


class Pair(NamedTuple):
    """One line of a list; lean, as CC12M and YFCC have over ten million."""

    key: str
    root: str  # the folder ``rel`` starts from: one string shared by a list's pairs
    rel: str
    caption: str  # cleaned; "" is skipped as "empty caption"
    extra: dict[str, Any] | None  # other JSON fields


def plan(lists: Sequence[Path], images: Path | None = None, *, split: str = "train",
         name: str = "image_text") -> Conversion:
    """One split, one sample per line of the lists (in order).

    Captions get the reference's cleanup: words given as a list are joined with spaces, ``<PERSON>`` becomes
    "person" and a caption ending in a letter or digit gets a ".". JSON fields other than the image and the
    caption (YFCC's title, description) are kept in the sample's json.

    Args:
        lists: the pair lists, read in order.
        images: the folder relative image paths start from (default: each list's folder); absolute paths
            are used as they are.
        split: the split name in the manifest.
        name: the data set name in the manifest.
    """
    pairs = []
    for path in lists:
        root = str(images or path.parent)
        for rel, caption, extra in _records(require(path, LAYOUT)):
            pairs.append(Pair(media_name(rel), root, rel, "".join(clean_captions([caption], period=True)),
                              extra or None))
    keys = unique_keys(pair.key for pair in pairs)
    manifest = Manifest(dataset=name, split=split, modality="image", tasks=task_names("image", "caption", "retrieval"),
                        source=", ".join(str(p) for p in lists))
    return Conversion(manifest, [pair._replace(key=key) for pair, key in zip(pairs, keys, strict=True)], pair_sample)


def pair_sample(pair: Pair) -> Sample:
    """The sample of a pair: image bytes, the caption as text, ``source`` and the other fields as json."""
    captions = (pair.caption,) if pair.caption else ()
    meta = {"source": pair.rel, **(pair.extra or {})}
    return image_sample(Item(pair.key, os.path.join(pair.root, pair.rel), captions=captions, meta=meta))


def _records(path: Path) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """(image path, caption, other fields) of each record, read line by line."""
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".txt", ".json", ".jsonl"):
        raise LayoutError(f"{path}: unknown list format; expected {LAYOUT}")
    with path.open(encoding="utf-8", newline="\n") as f:
        first = f.readline()
        lines = enumerate(chain([first], f), 1)
        if suffix in (".tsv", ".txt"):
            yield from _tsv(path, lines)
            return
        try:
            if suffix == ".json" and not _is_record(first):
                f.seek(0)
                yield from ((rel, caption, {}) for rel, caption in json.load(f).items())  # SBU: {path: caption}
                return
            for number, line in lines:
                if line.strip():
                    record = json.loads(line)
                    if "image" not in record:
                        raise LayoutError(f"{path}:{number}: no 'image' field; expected {LAYOUT}")
                    yield record.pop("image"), record.pop("caption", ""), record
        except (json.JSONDecodeError, AttributeError, TypeError) as e:
            raise LayoutError(f"{path}: not valid JSON ({e}); expected {LAYOUT}") from e


def _is_record(line: str) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and "image" in record


def _tsv(path: Path, lines: Iterator[tuple[int, str]]) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    columns = (0, 1)
    for number, line in lines:
        fields = line.rstrip("\r\n").split("\t")
        if number == 1 and fields[0].strip().lower() in PATH_COLUMNS + CAPTION_COLUMNS:  # a header
            header = [c.strip().lower() for c in fields]
            try:
                columns = (next(header.index(c) for c in PATH_COLUMNS if c in header),
                           next(header.index(c) for c in CAPTION_COLUMNS if c in header))
            except StopIteration:
                raise LayoutError(f"{path}: the header needs a path and a caption column; expected {LAYOUT}") from None
        elif line.strip():
            if len(fields) <= max(columns):
                raise LayoutError(f"{path}:{number}: expected 'path<TAB>caption', got {line.strip()[:80]!r}")
            yield fields[columns[0]].strip(), fields[columns[1]], {}
