"""Plain-text corpora (BookCorpus, Wikipedia; the reference's ``bookswiki.doc``): one sentence or paragraph a
line, grouped into passages of at least ``min_words`` words for masked language modelling."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from uniperceiver_cli.data.shards import Manifest, Sample, Skip
from uniperceiver_cli.data.sources.common import Conversion, require, unique_keys
from uniperceiver_cli.task_types import task_names

LAYOUT = "text files (or folders of them) with one sentence or paragraph a line"


class Passage(NamedTuple):
    """Consecutive lines of one file, by byte range; an empty range stands for a blank line."""

    key: str
    path: str
    start: int
    end: int
    line: int  # the first line's number (1-based)


def plan(sources: Sequence[Path], *, min_words: int = 128, split: str = "train", name: str = "text") -> Conversion:
    """One split: the files' lines in order, grouped into passages.

    A passage grows line by line until it holds at least ``min_words`` whitespace-separated words (as the
    reference grows one to 128 basic tokens); it does not cross files, and a file's shorter last passage is
    kept. Blank lines add nothing and are counted as skipped "empty text".

    Args:
        sources: text files, or folders whose files (all of them, recursively, sorted) are read.
        min_words: the least words in a passage.
        split: the split name in the manifest.
        name: the data set name in the manifest.
    """
    files = []
    for source in sources:
        if require(source, LAYOUT).is_dir():
            files += sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            files.append(source)
    items = [passage for path in files for passage in _passages(path, min_words)]
    keys = iter(unique_keys(p.key for p in items if p.start < p.end))
    items = [p._replace(key=next(keys)) if p.start < p.end else p for p in items]
    manifest = Manifest(dataset=name, split=split, modality="text", tasks=task_names("text", "mlm"),
                        source=", ".join(str(s) for s in sources), extra={"min_words": min_words})
    return Conversion(manifest, items, text_sample)


def _passages(path: Path, min_words: int) -> list[Passage]:
    blank = Passage("", str(path), 0, 0, 0)  # one shared item for every blank line: cheap on huge corpora
    out: list[Passage] = []
    offset = start = first = words = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            count = len(raw.decode("utf-8", "replace").split())
            if count == 0:
                out.append(blank)
            elif words == 0:
                start, first = offset, number
            offset += len(raw)
            words += count
            if words >= min_words:
                out.append(Passage(f"{path.stem}_{first:09d}", str(path), start, offset, first))
                words = 0
    if words:
        out.append(Passage(f"{path.stem}_{first:09d}", str(path), start, offset, first))
    return out


def text_sample(passage: Passage) -> Sample:
    """The passage's non-blank lines, stripped, one a line (a loader ends each with ``<|endoftext|>``)."""
    if passage.start == passage.end:
        raise Skip("empty text", f"a blank line in {passage.path}")
    with open(passage.path, "rb") as f:
        f.seek(passage.start)
        data = f.read(passage.end - passage.start)
    lines = (line.strip() for line in data.decode("utf-8", "replace").splitlines())
    return Sample(passage.key, text="\n".join(line for line in lines if line),
                  meta={"source": passage.path, "line": passage.line})
