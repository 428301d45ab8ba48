"""What every converter shares: the conversion description and checked reads of images and videos."""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from PIL import Image

from uniperceiver_cli.data.shards import (
    IMAGE_SUFFIXES,
    VIDEO_EXTS,
    VIDEO_SUFFIXES,
    Manifest,
    Sample,
    Skip,
    write_shards,
)
from uniperceiver_cli.task_types import task_names


class LayoutError(ValueError):
    """The source folder is not in the expected layout; the message names the layout (one line)."""


@dataclass
class Conversion:
    """One split of one data set, ready to be written: the manifest to fill, the items in order, and
    the function that turns an item into a sample (or raises Skip)."""

    manifest: Manifest
    items: Sequence[Any]
    make_sample: Callable[[Any], Sample]

    def write(self, out: str | Path, *, min_shards: int = 8, max_per_shard: int = 1000, workers: int = 1,
              progress: bool = True) -> Manifest:
        return write_shards(out, self.items, self.make_sample, manifest=self.manifest, min_shards=min_shards,
                            max_per_shard=max_per_shard, workers=workers, progress=progress)


def require(path: Path, layout: str) -> Path:
    """``path`` must exist; otherwise one line naming it and the expected layout."""
    if not path.exists():
        raise LayoutError(f"{path} not found; expected layout: {layout}")
    return path


@lru_cache(maxsize=8)
def _zip(path: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(path)


def read_bytes(path: str | Path) -> bytes:
    """File bytes; ``archive.zip@/inner/path`` reads a member of a zip (the reference's CC layout)."""
    text = str(path)
    try:
        if ".zip@" in text:
            archive, inner = text.split(".zip@", 1)
            return _zip(archive + ".zip").read(inner.lstrip("/"))
        return Path(text).read_bytes()
    except (FileNotFoundError, KeyError) as e:
        raise Skip("missing file", text) from e
    except (OSError, zipfile.BadZipFile) as e:
        raise Skip("unreadable file", f"{text}: {e}") from e


def read_image(path: str | Path) -> tuple[bytes, str]:
    """Image bytes and extension ("jpg"/"png"), decoded once to check them; other formats become PNG."""
    data = read_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format in ("JPEG", "PNG"):
                return data, "jpg" if image.format == "JPEG" else "png"
            out = io.BytesIO()
            image.convert("RGB").save(out, format="PNG")
            return out.getvalue(), "png"
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bad files
        raise Skip("undecodable image", f"{path}: {e}") from e


def read_video(path: str | Path) -> tuple[bytes, str]:
    """Video bytes and container extension, opened with decord to check they hold frames (what decord and
    ffmpeg print about a bad video goes into the skip's detail)."""
    from uniperceiver_cli.data.video import open_video  # decord loads only for video data sets

    ext = Path(str(path)).suffix.lstrip(".").lower()
    if ext not in VIDEO_EXTS:
        raise Skip("unsupported video format", str(path))
    data = read_bytes(path)
    try:
        open_video(data)
    except Skip as skip:
        raise Skip(skip.reason, f"{path}: {skip.detail}" if skip.detail else str(path)) from skip
    return data, ext


def safe_key(text: str) -> str:
    """A WebDataset key from a source id: no dots or slashes (they separate extensions and folders)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


SPLIT_PREFIXES = ("train", "restval", "val", "test")


class Item(NamedTuple):
    """One sample to read: its key, its media file and what goes with it (picklable, printable)."""

    key: str
    path: str  # the media file ("archive.zip@/inner" allowed); "" when the converter found none
    label: int | None = None  # class index
    captions: tuple[str, ...] | None = None  # None: no text; empty: skipped as "empty caption"
    meta: dict[str, Any] | None = None  # goes into the sample's json


def _media_sample(item: Item, *, video: bool) -> Sample:
    if item.captions is not None and not item.captions:
        raise Skip("empty caption", item.path or item.key)
    if not item.path:
        raise Skip("missing file", f"{item.key}: not found")
    data, ext = read_video(item.path) if video else read_image(item.path)
    meta = dict(item.meta or {})
    if item.captions is not None:
        meta["captions"] = list(item.captions)
    media = {"video": data, "video_ext": ext} if video else {"image": data, "image_ext": ext}
    return Sample(item.key, label=item.label, meta=meta, text=item.captions[0] if item.captions else None, **media)


def image_sample(item: Item) -> Sample:
    """The sample of an image item: image bytes, class index, first caption as text, meta as json."""
    return _media_sample(item, video=False)


def video_sample(item: Item) -> Sample:
    """The sample of a video item: video bytes, class index, first caption as text, meta as json."""
    return _media_sample(item, video=True)


def unique_keys(names: Iterable[str]) -> list[str]:
    """Unique sample keys from names: ``safe_key``, then "-2", "-3"... on repeats."""
    keys: dict[str, None] = {}  # ordered, and a fast membership test
    for name in names:
        key = base = safe_key(name)
        count = 1
        while key in keys:
            count += 1
            key = f"{base}-{count}"
        keys[key] = None
    return list(keys)


def keyed(items: Iterable[Item]) -> list[Item]:
    """The items with their names (in ``key``) made into unique sample keys (:func:`unique_keys`)."""
    items = list(items)
    return [item._replace(key=key) for item, key in zip(items, unique_keys(i.key for i in items), strict=True)]


def clean_captions(raw: Iterable[Any], *, period: bool = False) -> tuple[str, ...]:
    """Captions as one-line strings, empty ones dropped. A caption given as a list of words is joined with
    spaces. ``period`` applies the reference's CC/SBU/VG cleanup: ``<PERSON>`` becomes "person" and a
    caption ending in a letter or digit gets "." appended."""
    out = []
    for text in raw:
        caption = " ".join(map(str, text)) if isinstance(text, list) else str(text or "")
        if period:
            caption = caption.replace("<PERSON>", "person")
        caption = " ".join(caption.split())
        if period and caption and caption[-1].isalnum():
            caption += "."
        if caption:
            out.append(caption)
    return tuple(out)


def read_class_names(path: Path) -> list[str]:
    """Class names, one a line in index order."""
    names = [line.strip() for line in require(path, "one class name a line").read_text().splitlines()]
    if "" in names:
        raise ValueError(f"{path}: line {names.index('') + 1} is empty; expected one class name a line")
    return names


def numbered_lines(path: Path, layout: str, maxsplit: int = -1) -> list[tuple[list[str], int]]:
    """(the other fields, the number) of each line of a list file in ``layout`` ("relative_path label"), split at
    whitespace from the right (at most ``maxsplit`` times); blank lines are skipped."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.rsplit(maxsplit=maxsplit)
        if not fields:
            continue
        if len(fields) != len(layout.split()) or not fields[-1].isdigit():
            raise LayoutError(f"{path}:{number}: expected {layout!r}, got {line[:80]!r}")
        rows.append((fields[:-1], int(fields[-1])))
    return rows


def class_folders(src: Path, suffixes: tuple[str, ...]) -> dict[str, dict[str, list[Path]]]:
    """``SRC/<split>/<class>/<file>``: split -> class folder -> its files with one of ``suffixes``, all sorted.
    A split is a folder whose class folders hold at least one such file; hidden folders are ignored."""
    splits: dict[str, dict[str, list[Path]]] = {}
    for split in _subdirs(src):
        classes = {c.name: sorted(f for f in c.iterdir() if f.is_file() and f.suffix.lower() in suffixes)
                   for c in _subdirs(split)}
        if any(classes.values()):
            splits[split.name] = classes
    return splits


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def index_files(root: Path, suffixes: tuple[str, ...]) -> dict[str, str]:
    """The files under ``root`` with one of ``suffixes``, by relative path both with and without the
    suffix (without it, the first suffix in ``suffixes`` order wins). One walk, then lookups are free."""
    found: dict[str, str] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder, name)
            if path.suffix.lower() in suffixes:
                found[path.relative_to(root).as_posix()] = str(path)
    index = dict(found)
    for rel in sorted(found, key=lambda r: suffixes.index(Path(r).suffix.lower()), reverse=True):
        index[rel[: -len(Path(rel).suffix)]] = found[rel]
    return index


def split_name(path: Path) -> str:
    """The split a list file holds, from its name: the first ``_``/``-``/``.`` separated part starting
    with train, restval, val or test (``captions_train2014.json`` -> train2014,
    ``caption_msvd_val_cocostyle.json`` -> val), else the whole stem."""
    parts = re.split(r"[_.-]", path.stem)
    return next((p for p in parts if p.lower().startswith(SPLIT_PREFIXES)), path.stem)


def select_splits(available: Iterable[str], wanted: Sequence[str] | None, source: Path) -> list[str]:
    """``wanted`` (in that order) when given, each one checked to be ``available``; else all available."""
    available = list(available)
    for split in wanted or ():
        if split not in available:
            raise LayoutError(f"no split {split!r} in {source} (found: {', '.join(available) or 'none'})")
    return list(wanted) if wanted else available


def load_json(path: Path, layout: str) -> Any:
    """A JSON file's content; a missing or malformed file is a layout error naming ``layout``."""
    try:
        return json.loads(require(path, layout).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LayoutError(f"{path} is not valid JSON ({e}); expected layout: {layout}") from e


def media_name(rel: str) -> str:
    """A media path without its image or video suffix: the name a sample key is made from."""
    path = PurePosixPath(rel)
    return str(path.with_suffix("")) if path.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES else rel


def class_item(rel: str, path: Path, label: int, names: Sequence[str]) -> Item:
    """The item of an image or video of class ``label``, keyed by its relative path ``rel`` (also its source)."""
    return Item(media_name(rel), str(path), label, meta={"label": names[label], "source": rel})


def folder_items(folders: dict[str, list[Path]], labels: dict[str, int], names: Sequence[str]) -> list[Item]:
    """Items of class folders (folder -> files): the folder's label, its class name and ``folder/file`` as source."""
    return [class_item(f"{folder}/{f.name}", f, labels[folder], names)
            for folder, files in folders.items() for f in files]


def classification_conversion(source: str, split: str, items: list[Item], classes: list[str], name: str, *,
                              video: bool = False) -> Conversion:
    """A classification split of images (or videos): ``classes`` in label order, the items under unique keys."""
    modality = "video" if video else "image"
    manifest = Manifest(dataset=name, split=split, modality=modality, tasks=task_names(modality, "classification"),
                        source=source, classes=classes)
    return Conversion(manifest, keyed(items), video_sample if video else image_sample)


def caption_conversion(source: str, split: str, items: list[Item], name: str, *, video: bool = False) -> Conversion:
    """A caption and retrieval split of images (or videos): the items under unique keys, their captions counted."""
    modality = "video" if video else "image"
    tasks = task_names(modality, "caption", "retrieval")
    manifest = Manifest(dataset=name, split=split, modality=modality, tasks=tasks, source=source,
                        extra={"captions": sum(len(item.captions or ()) for item in items)})
    return Conversion(manifest, keyed(items), video_sample if video else image_sample)
