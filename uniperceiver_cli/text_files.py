"""Texts a user hands in: small files read with a size limit, JSON files parsed in one line's error, files with one
entry per line (class names, prompt templates, candidate texts), and class names put into prompt templates."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MAX_TEXT_FILE = 64 << 20  # a manifest of 100k shards, 21,842 class names: a few MB


def read_small(path: Path, what: str, limit: int = MAX_TEXT_FILE) -> bytes:
    """The bytes of a handed file, read up to ``limit``: a larger one (or a link to an endless device) is refused in
    one line (ValueError) before it fills memory."""
    with path.open("rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{what} {path} is larger than {limit >> 20} MB; not read")
    return data


def read_json(path: Path, what: str, limit: int = MAX_TEXT_FILE) -> Any:
    """A handed JSON file, parsed; any problem (too large, not UTF-8, not JSON, nested too deeply) is one line."""
    try:
        return json.loads(read_small(path, what, limit))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())[:200]
        raise ValueError(f"{what} {path} is not valid JSON ({reason})") from None


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty lines of a text file (labels, templates, texts), stripped."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        text = read_small(path, f"{what} file").decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} file {path} is not UTF-8 text ({e.reason})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{what} file {path} has no entries")
    return lines


def prompted(names: Sequence[str], templates: Sequence[str] | None) -> list[list[str]]:
    """Each template filled with every class name, one list per template ("a photo of a {}."); without templates
    the bare names, as the reference encodes them. Their features are averaged over the templates."""
    if not names:
        raise ValueError("no class names given")
    templates = list(templates) if templates else ["{}"]
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"template {template!r} has no '{{}}' for the class name")
    return [[template.format(name) for name in names] for template in templates]
