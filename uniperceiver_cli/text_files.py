"""Texts a user hands in: files with one entry per line (class names, prompt templates, candidate texts), and
class names put into prompt templates."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty lines of a text file (labels, templates, texts), stripped."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
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
