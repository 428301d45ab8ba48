"""ImageNet-21k (the reference's "imagenet22k"): ``imagenet_22k_filelist_short.txt`` lines ``wnid idx class_id``,
each image at ``SRC/<wnid>/<wnid>_<idx>.JPEG``."""

from __future__ import annotations

from pathlib import Path

from uniperceiver_cli.data.sources.common import (
    Conversion,
    Item,
    classification_conversion,
    numbered_lines,
    read_class_names,
    require,
)

FILELIST = "imagenet_22k_filelist_short.txt"
LAYOUT = f"SRC/{FILELIST} with lines 'wnid idx class_id' and images at SRC/<wnid>/<wnid>_<idx>.JPEG"


def plan(src: Path, *, filelist: Path | None = None, class_names: Path | None = None, split: str = "train",
         name: str = "imagenet21k") -> Conversion:
    """The one split the file list describes.

    Args:
        src: the folder holding the ``<wnid>`` image folders.
        filelist: the list (default ``SRC/imagenet_22k_filelist_short.txt``).
        class_names: a file with one class name a line in class_id order; default: each class's wnid.
        split: the split name in the manifest.
        name: the data set name in the manifest.
    """
    filelist = require(filelist or src / FILELIST, LAYOUT)
    rows = [(wnid, idx, label) for (wnid, idx), label in numbered_lines(filelist, "wnid idx class_id")]
    wnids = {label: wnid for wnid, _, label in reversed(rows)}  # reversed: a label's first wnid is written last
    num_classes = 1 + max(wnids, default=-1)
    names = read_class_names(class_names) if class_names else [wnids.get(i, str(i)) for i in range(num_classes)]
    if len(names) < num_classes:
        raise ValueError(f"{len(names)} class names but {filelist} uses class ids up to {num_classes - 1}")
    items = [Item(f"{wnid}_{idx}", str(src / wnid / f"{wnid}_{idx}.JPEG"), label,
                  meta={"label": names[label], "source": f"{wnid}/{wnid}_{idx}.JPEG"}) for wnid, idx, label in rows]
    return classification_conversion(str(src), split, items, names, name)
