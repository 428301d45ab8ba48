"""Text files a user hands in with one entry per line: class names, prompt templates, candidate texts."""

from __future__ import annotations

from pathlib import Path


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty lines of a text file (labels, templates, texts), stripped."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{what} file {path} has no entries")
    return lines
