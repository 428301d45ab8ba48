"""ImageNet-1k: class folders ``SRC/<split>/<class>/<image>`` or the reference's lists ``SRC/meta/<split>.txt``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from uniperceiver_cli.data.sources.common import (
    IMAGE_SUFFIXES,
    Conversion,
    LayoutError,
    class_folders,
    class_item,
    classification_conversion,
    folder_items,
    numbered_lines,
    read_class_names,
    select_splits,
)

LAYOUT = "SRC/<split>/<class_dir>/<image> class folders, or SRC/meta/<split>.txt lists of 'relative_path label'"


def plan(src: Path, *, splits: Sequence[str] | None = None, class_names: Path | None = None,
         name: str = "imagenet") -> list[Conversion]:
    """One conversion per split.

    With ``SRC/meta/*.txt`` the lists are used (``relative_path label`` lines, images under
    ``SRC/<split>/``); otherwise the class folders (class index = the sorted class folder names, the same
    for every split).

    Args:
        src: the data set folder.
        splits: only these splits (default: all found).
        class_names: a file with one class name a line in index order; default: the class folder names
            (with meta lists: the first folder of each label's image paths, else the label number).
        name: the data set name in the manifests.
    """
    if not src.is_dir():
        raise LayoutError(f"{src} is not a folder; expected layout: {LAYOUT}")
    names = read_class_names(class_names) if class_names else None
    lists = sorted((src / "meta").glob("*.txt")) if (src / "meta").is_dir() else []
    if lists:
        return _from_lists(src, lists, splits, names, name)
    folders = class_folders(src, IMAGE_SUFFIXES)
    if not folders:
        raise LayoutError(f"{src} has neither class folders nor meta lists; expected layout: {LAYOUT}")
    classes = sorted({c for split in folders.values() for c in split})
    if names is not None and len(names) != len(classes):
        raise ValueError(f"{class_names} has {len(names)} names but {src} has {len(classes)} class folders")
    names, labels = names or classes, {c: i for i, c in enumerate(classes)}
    return [classification_conversion(str(src), split, folder_items(folders[split], labels, names), names, name)
            for split in select_splits(folders, splits, src)]


def _from_lists(src: Path, lists: list[Path], splits: Sequence[str] | None, names: list[str] | None,
                name: str) -> list[Conversion]:
    entries = {path.stem: [(fields[0], label) for fields, label in numbered_lines(path, "relative_path label", 1)]
               for path in lists}
    rows = [row for split_rows in entries.values() for row in split_rows]
    num_classes = 1 + max((label for _, label in rows), default=-1)
    if names is None:  # each label's first folder; reversed, so that the first one is written last
        folders = {label: rel.split("/", 1)[0] for rel, label in reversed(rows) if "/" in rel}
        names = [folders.get(i, str(i)) for i in range(num_classes)]
    elif len(names) < num_classes:
        raise ValueError(f"{len(names)} class names but the lists use labels up to {num_classes - 1}")
    conversions = []
    for split in select_splits(entries, splits, src / "meta"):
        items = [class_item(rel, src / split / rel, label, names) for rel, label in entries[split]]
        conversions.append(classification_conversion(str(src), split, items, names, name))
    return conversions

