"""Visual Genome region captions: the reference's ``vg_captions_128filter.json`` =
``{"phrase": {image_id: [captions]}, "subset": {image_id: relative_path}}`` with images under one folder."""

from __future__ import annotations

from pathlib import Path

from uniperceiver_cli.data.sources.common import (
    Conversion,
    Item,
    LayoutError,
    caption_conversion,
    clean_captions,
    load_json,
    media_name,
    require,
)

LAYOUT = "vg_captions_128filter.json = {'phrase': {image_id: [captions]}, 'subset': {image_id: relative_path}}"


def plan(annotations: Path, images: Path | None = None, *, split: str = "train",
         name: str = "visual_genome") -> Conversion:
    """One split, one sample per image (``subset`` order, then images that only have phrases) with all its
    captions, cleaned as the reference does (a "." after a final letter or digit).

    Args:
        annotations: the caption json.
        images: the folder the ``subset`` paths are relative to (default: the json's folder).
        split: the split name in the manifest.
        name: the data set name in the manifest.
    """
    images = require(images or annotations.parent, "a folder of images")
    data = load_json(annotations, LAYOUT)
    if not (isinstance(data, dict) and isinstance(data.get("phrase"), dict) and isinstance(data.get("subset"), dict)):
        raise LayoutError(f"{annotations} lacks the 'phrase' and 'subset' dicts; expected {LAYOUT}")
    phrases, subset = data["phrase"], data["subset"]
    items = []
    for image_id in dict.fromkeys([*subset, *phrases]):
        rel = subset.get(image_id, "")
        items.append(Item(media_name(rel) or f"id_{image_id}", str(images / rel) if rel else "",
                          captions=clean_captions(phrases.get(image_id, ()), period=True),
                          meta={"id": image_id, "source": rel}))
    return caption_conversion(str(annotations), split, items, name)
