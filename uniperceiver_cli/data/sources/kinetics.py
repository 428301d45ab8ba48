"""Kinetics-400/700 and Moments in Time: annotation CSVs plus a video folder, or class folders
``SRC/<split>/<label>/<video>``."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from uniperceiver_cli.data.sources.common import (
    VIDEO_SUFFIXES,
    Conversion,
    Item,
    LayoutError,
    class_folders,
    classification_conversion,
    folder_items,
    index_files,
    read_class_names,
    require,
    select_splits,
    split_name,
)

LAYOUT = ("a CSV whose header names youtube_id (or id), label and optionally time_start, time_end, split; "
          "or SRC/<split>/<label>/<video> class folders")
ID_COLUMNS = ("youtube_id", "id", "video_id", "filename", "file")


class Row(NamedTuple):
    split: str
    names: tuple[str, ...]  # the file names to look for, best first (without suffix, or with the id's own)
    label: str  # "" when the CSV gives none (a test split)
    meta: dict[str, object]


def plan(sources: Sequence[Path], videos: Path | None = None, *, splits: Sequence[str] | None = None,
         class_names: Path | None = None, name: str = "kinetics") -> list[Conversion]:
    """One conversion per split.

    Either one class-folder tree, or annotation CSVs. A CSV row's split is its ``split`` column, else the
    CSV's name (:func:`split_name`); its video is the first found, under ``videos``, of
    ``<split>/<label>/``, ``<split>/``, ``<label>/``, then ``./`` (the label also tried with ``_`` for spaces),
    named ``{id}_{time_start:06d}_{time_end:06d}`` then ``{id}``, with any video suffix.

    Args:
        sources: one class-folder tree, or CSVs.
        videos: the folder the CSVs' videos are under (default: the first CSV's folder).
        splits: only these splits (default: all found).
        class_names: one class name a line, in index order; default: the sorted labels (of all splits).
        name: the data set name in the manifests.
    """
    if len(sources) == 1 and sources[0].is_dir():
        if videos is not None:
            raise ValueError("--videos goes with CSV lists; a class-folder tree holds its videos")
        folders = class_folders(sources[0], VIDEO_SUFFIXES)
        if not folders:
            raise LayoutError(f"{sources[0]} has no class folders; expected {LAYOUT}")
        names, labels = _classes({label for split in folders.values() for label in split}, class_names)
        return [classification_conversion(str(sources[0]), split, folder_items(folders[split], labels, names),
                                          names, name, video=True)
                for split in select_splits(folders, splits, sources[0])]
    rows = [row for path in sources for row in _read_csv(path)]
    names, labels = _classes({row.label for row in rows if row.label}, class_names)
    root = require(videos or sources[0].parent, "a folder of videos")
    index = index_files(root, VIDEO_SUFFIXES)
    by_split: dict[str, list[Item]] = {}
    for row in rows:
        path = next((index[f] for f in _candidates(row) if f in index), "")
        meta = {**row.meta, "label": row.label} if row.label else row.meta
        meta["source"] = Path(path).relative_to(root).as_posix() if path else ""
        by_split.setdefault(row.split, []).append(Item(row.names[0], path, labels.get(row.label), meta=meta))
    source = ", ".join(str(p) for p in sources)
    return [classification_conversion(source, split, by_split[split], names, name, video=True)
            for split in select_splits(by_split, splits, sources[0])]


def _read_csv(path: Path) -> list[Row]:
    with require(path, LAYOUT).open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = [c.strip().lower() for c in reader.fieldnames or ()]
        id_column = next((c for c in ID_COLUMNS if c in columns), None)
        if id_column is None or "label" not in columns:
            raise LayoutError(f"{path}: the header {columns} lacks an id or label column; expected {LAYOUT}")
        reader.fieldnames = columns
        rows = []
        for record in reader:
            ident = (record[id_column] or "").strip()
            meta: dict[str, object] = {"id": ident}
            names = (ident,)
            if record.get("time_start") and record.get("time_end"):
                start, end = int(float(record["time_start"])), int(float(record["time_end"]))
                meta.update(time_start=start, time_end=end)
                names = (f"{ident}_{start:06d}_{end:06d}", ident)
            split = (record.get("split") or "").strip() or split_name(path)
            rows.append(Row(split, names, (record["label"] or "").strip(), meta))
    return rows


def _candidates(row: Row) -> list[str]:
    label_dirs = list(dict.fromkeys([row.label, row.label.replace(" ", "_")])) if row.label else []
    folders = [f"{row.split}/{d}" for d in label_dirs] + [row.split, *label_dirs, ""]
    return [f"{folder}/{file}" if folder else file for folder in folders for file in row.names]


def _classes(found: set[str], class_names: Path | None) -> tuple[list[str], dict[str, int]]:
    """The class names in index order (default: the ``found`` labels, sorted) and the index of each."""
    names = sorted(found) if class_names is None else read_class_names(class_names)
    unknown = sorted(found - set(names))
    if unknown:
        raise ValueError(f"{len(unknown)} labels are not in {class_names}, e.g. {unknown[0]!r}")
    return names, {label: i for i, label in enumerate(names)}
