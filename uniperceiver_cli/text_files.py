"""Texts a user hands in: values cut short for one-line messages, YAML without aliases or repeated keys, small files
read with a size limit, JSON files parsed in one line's error, files with one entry per line (class names, prompt
templates, candidate texts), and class names put into prompt templates. Imports nothing of the package."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

MAX_SHOWN = 80  # characters of a value an error message shows


def shorten(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` cut to ``limit`` characters ("..." marks a cut), for error messages that must stay one short line."""
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def shown(value: object) -> str:
    """``repr(value)`` for an error message, cut to :data:`MAX_SHOWN` characters; a huge integer by its length
    (Python refuses to write one of over 4300 digits)."""
    if isinstance(value, int) and value.bit_length() > 4 * MAX_SHOWN:
        return f"an integer of about {round(value.bit_length() * math.log10(2))} digits"
    return shorten(repr(value))


def _one_line(text: object) -> str:
    return shorten(" ".join(str(text).split()), 200)


class _Refused(yaml.MarkedYAMLError):
    """YAML that a recipe may not hold; reported as ``line N: problem``."""


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader without anchors and aliases (1.6 KB of nested aliases expand to gigabytes) and without
    repeated keys (which PyYAML would take silently, the last one winning)."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(problem="anchors and aliases (&name, *name) are not allowed: write the value out",
                           problem_mark=event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):  # a list or mapping as a key is refused as unhashable
                key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                if key in lines:
                    raise _Refused(problem=f"key {shown(key)} is given twice (lines {lines[key]} and {line})",
                                   problem_mark=key_node.start_mark)
                lines[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(text: str, source: str, error: type[ValueError] = ValueError) -> Any:
    """Parsed YAML without anchors, aliases or repeated keys; any problem is a one-line ``error`` starting with
    ``source``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader
    except _Refused as e:
        raise error(f"{source}: line {e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.reader.ReaderError as e:  # a control character, such as a null byte
        line = text.count("\n", 0, e.position) + 1
        raise error(f"{source}: line {line} is not valid YAML (character #x{e.character:04x} is not allowed)"
                          ) from None
    except yaml.MarkedYAMLError as e:
        where = f" line {e.problem_mark.line + 1}" if e.problem_mark is not None else ""
        problem = "; ".join(part for part in (e.context, e.problem) if part)  # "while parsing ...", what was found
        raise error(f"{source}:{where} is not valid YAML ({_one_line(problem or e)})") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: a tagged or date-like scalar that does not convert
        raise error(f"{source}: is not valid YAML ({_one_line(e)})") from None
    except RecursionError:
        raise error(f"{source}: is nested too deeply to be a recipe") from None


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
        data = read_small(path, what, limit)
    except ValueError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({' '.join(str(e).split())[:200]})") from None
    return parse_json(data, f"{what} {path}")


def parse_json(data: bytes, where: str) -> Any:
    """Handed JSON bytes, parsed; not UTF-8, not JSON or nested too deeply is one line naming ``where``."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())[:200]
        raise ValueError(f"{where} is not valid JSON ({reason})") from None


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
