"""GLUE in its official TSV layout (``GLUE_DIR/<TASK>/train.tsv``, ``dev.tsv``; MNLI ``dev_matched.tsv`` and
``dev_mismatched.tsv``) as cloze prompts for text classification, the reference's templates (its ``GLUE.py``): the
sentences around a ``<|spe|>`` slot, scored against one-token label words. The unlabelled test files are not
converted. STS-B, a regression, is refused: the reference never wired a loss for it."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniperceiver_cli.data.shards import Manifest, Sample, Skip
from uniperceiver_cli.data.sources.common import Conversion, LayoutError, require
from uniperceiver_cli.task_types import task_names

LAYOUT = "GLUE_DIR/<TASK>/train.tsv and dev.tsv (MNLI: dev_matched.tsv, dev_mismatched.tsv), as GLUE distributes them"


def _pair(template: str) -> Callable[[list[str]], str]:
    """A two-sentence prompt; the first sentence loses one final period, as the reference drops that token."""
    def prompt(sentences: list[str]) -> str:
        first = sentences[0][:-1] if sentences[0].endswith(".") else sentences[0]
        return template.format(first, sentences[1])
    return prompt


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task's rows become prompts and labels."""

    splits: tuple[str, ...]  # the labelled files' stems
    header: bool  # CoLA's files have none
    columns: tuple[str | int, ...]  # the sentence columns (names, or positions without a header)
    label: str | int
    labels: dict[str, int]  # the file's label value -> the index of its label word
    words: tuple[str, ...]  # the label words, one token each
    prompt: Callable[[list[str]], str]


TASKS: dict[str, GlueTask] = {
    "SST-2": GlueTask(("train", "dev"), True, ("sentence",), "label", {"0": 0, "1": 1}, ("bad", "wonderful"),
                      lambda s: f"{s[0]} <|endoftext|> It is <|spe|>."),
    "CoLA": GlueTask(("train", "dev"), False, (3,), 1, {"0": 0, "1": 1}, ("incorrect", "correct"),
                     lambda s: f"{s[0]} This is <|spe|>."),
    "RTE": GlueTask(("train", "dev"), True, ("sentence1", "sentence2"), "label",
                    {"not_entailment": 0, "entailment": 1}, ("no", "yes"),
                    _pair("{} ? <|endoftext|> it is <|spe|> , {}")),
    "MRPC": GlueTask(("train", "dev"), True, ("#1 String", "#2 String"), "Quality", {"0": 0, "1": 1}, ("no", "yes"),
                     _pair("{} . <|spe|> , {}")),
    "QQP": GlueTask(("train", "dev"), True, ("question1", "question2"), "is_duplicate", {"0": 0, "1": 1},
                    ("no", "yes"), _pair("{} <|endoftext|> <|spe|> , {}")),
    "QNLI": GlueTask(("train", "dev"), True, ("question", "sentence"), "label",
                     {"not_entailment": 0, "entailment": 1}, ("no", "yes"),
                     _pair("{} <|endoftext|> it is <|spe|> , {}")),
    "MNLI": GlueTask(("train", "dev_matched", "dev_mismatched"), True, ("sentence1", "sentence2"), "gold_label",
                     {"contradiction": 0, "neutral": 1, "entailment": 2}, ("no", "maybe", "yes"),
                     lambda s: f"{s[0]} <|spe|> , {s[1]}"),
}
REFUSED = {"STS-B": "STS-B is a regression (a 0-5 similarity score), which the reference left unwired; it is not "
                    "converted"}


@dataclass(frozen=True)
class Row:
    key: str
    sentences: tuple[str, ...]
    label: str


def plan(folder: Path, task: str, *, name: str = "glue") -> list[Conversion]:
    """The labelled splits of one GLUE task folder, one conversion each (written to ``OUT/<split>``)."""
    if task in REFUSED:
        raise LayoutError(REFUSED[task])
    if task not in TASKS:
        raise LayoutError(f"unknown GLUE task {task!r}; choose from {', '.join(TASKS)}")
    spec = TASKS[task]
    conversions = []
    for split in spec.splits:
        path = require(folder / f"{split}.tsv", LAYOUT)
        rows = _rows(path, spec, f"{task.lower()}-{split}")
        manifest = Manifest(dataset=f"{name}-{task.lower()}", split=split, modality="text",
                            tasks=task_names("text", "text_classification"), source=str(path),
                            classes=list(spec.words), extra={"glue_task": task})
        conversions.append(Conversion(manifest, rows, _maker(spec)))
    return conversions


def _rows(path: Path, spec: GlueTask, prefix: str) -> list[Row]:
    """The file's rows (GLUE's TSVs are unquoted: a quote is a character); a row missing a column keeps its place
    and is skipped when written ("bad row")."""
    with path.open(encoding="utf-8-sig", newline="") as f:  # MRPC's files start with a byte-order mark
        lines = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = lines.pop(0) if spec.header and lines else []
    positions = [_column(c, header, path) for c in (*spec.columns, spec.label)]
    rows = []
    for i, line in enumerate(lines):
        values = [line[p].strip() if p < len(line) else "" for p in positions]
        rows.append(Row(f"{prefix}-{i:07d}", tuple(values[:-1]), values[-1]))
    return rows


def _column(column: str | int, header: list[str], path: Path) -> int:
    if isinstance(column, int):
        return column
    if column not in header:
        raise LayoutError(f"{path} has no column {column!r} (its header: {', '.join(header)[:300]})")
    return header.index(column)


def _maker(spec: GlueTask) -> Callable[[Row], Sample]:
    def make(row: Row) -> Sample:
        if not all(row.sentences):
            raise Skip("bad row", f"{row.key}: a sentence is missing")
        if row.label not in spec.labels:
            raise Skip("bad label", f"{row.key}: {row.label[:50]!r}")
        meta: dict[str, Any] = {"sentences": list(row.sentences)}
        return Sample(row.key, text=spec.prompt(list(row.sentences)), label=spec.labels[row.label], meta=meta)
    return make
