"""``uniperceiver predict``: labels, matching texts, captions or answers to a question for your own image and video
files; or the label words of cloze sentences."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from uniperceiver_cli.cli.common import (
    MODEL_HELP,
    Vocabulary,
    err_console,
    load_any_model,
    one_line_warnings,
    pick_device,
    user_errors,
)
from uniperceiver_cli.data.shards import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from uniperceiver_cli.predict import Answer, Read, onnx_answerer, sentence_answerer, torch_answerer
from uniperceiver_cli.progress import terminal_progress

STDIN = "-"
PROMPT_LEN = 256  # sentences are cut around their slot to this many tokens (the reference's GLUE length)
T = TypeVar("T")


def _expand(path: Path) -> list[Path]:
    """A folder's image and video files (sorted, recursively), or the path itself."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
    return [path]


def _inputs(files: list[Path], files_from: Path | None) -> tuple[Iterator[Path], int | None]:
    """The files to answer, and how many when known beforehand. A path given on the command line must exist (one
    line, before any work); the lines of a list file or of standard input (``-``) are read as they come, and one
    that does not exist is answered with an error line, as an unreadable file is."""
    from uniperceiver_cli.text_files import read_lines

    sources = [*files, *([files_from] if files_from is not None else [])]
    if not sources:
        raise ValueError("give files or folders, or --files-from LIST (- for standard input)")
    streamed = any(str(p) == STDIN for p in sources)
    for path in sources:
        if str(path) != STDIN and not path.exists():
            raise FileNotFoundError(f"{path} does not exist")

    def listed(path: Path) -> Iterator[Path]:
        if str(path) == STDIN:
            yield from (Path(line.strip()) for line in sys.stdin if line.strip())
        elif path == files_from:
            yield from map(Path, read_lines(path, "file list"))
        else:
            yield from _expand(path)

    paths = (found for source in sources for listed_path in listed(source) for found in _expand(listed_path))
    if streamed:
        return paths, None
    collected = list(paths)
    if not collected:
        raise ValueError("no image or video files found in " + ", ".join(map(str, sources)))
    return iter(collected), len(collected)


def _batches(items: Iterator[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict(
    files: list[Path] | None = typer.Argument(None, help="Image and video files, or folders of them; - reads "
                                              "paths from standard input, one per line."),
    files_from: Path | None = typer.Option(None, "--files-from", help="A file listing paths, one per line "
                                           "(- for standard input)."),
    model: Path | None = typer.Option(None, "--model", help=MODEL_HELP),
    preset: str | None = typer.Option(None, help="Model preset: the shape of an official file, or a fresh model."),
    labels: Path | None = typer.Option(None, help="Class names, one per line: print the top-k labels."),
    label: list[str] | None = typer.Option(None, help="A class name (repeat the option for several)."),
    templates: Path | None = typer.Option(None, help="Prompt templates for the labels, with {} for the name."),
    texts: Path | None = typer.Option(None, help="Candidate texts, one per line: print the best matches."),
    caption: bool = typer.Option(False, "--caption", help="Generate a caption for each file."),
    question: str | None = typer.Option(None, "--question", help="Answer this question about each image, choosing "
                                        "among the answers of --labels/--label (visual question answering)."),
    sentence: list[str] | None = typer.Option(None, "--sentence", help="Classify this sentence instead of files: "
                                              "the --labels/--label word (one token each) at its <|spe|> slot "
                                              "(repeatable)."),
    sentences: Path | None = typer.Option(None, "--sentences", help="Sentences to classify as --sentence does, one "
                                          "per line."),
    top_k: int = typer.Option(5, min=1),
    beam_size: int = typer.Option(2, min=1),
    max_len: int = typer.Option(21, min=1),
    vocabulary: Vocabulary = typer.Option(
        Vocabulary.trained, help="Captions: decode over the tokens the model's caption task trained on (trained; all "
        "when the bundle records none) or all 49,411 (full)."),
    num_frames: int = typer.Option(8, min=1, help="Frames sampled evenly over each video."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Files per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON array at the end instead of a table."),
    jsonl: bool = typer.Option(False, "--jsonl", help="Print one JSON line per file as each batch is done."),
    out: Path | None = typer.Option(None, "--out", help="Write one JSON line per file to this new file as each "
                                    "batch is done (an existing file is not replaced)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
    routing_task: str | None = typer.Option(None, "--routing-task", help="Task-routed MoE models: the training "
                                            "task whose experts to use."),
) -> None:
    """Zero-shot labels (--labels/--label), best-matching texts (--texts), captions (--caption) or answers to a
    question (--question, with --labels/--label as the answers) for files, in batches; or the label word of each
    sentence's <|spe|> slot (--sentence/--sentences, text classification). --jsonl and --out stream one JSON line per
    file (an unreadable file gets an "error" line); the exit code is 1 when a file was skipped. --model DIR/onnx runs
    an exported model on onnxruntime, without importing PyTorch."""
    from uniperceiver_cli.onnx.runtime import is_onnx_folder
    from uniperceiver_cli.text_files import read_lines

    with user_errors(), one_line_warnings():
        has_labels, classify = labels is not None or bool(label), bool(sentence) or sentences is not None
        if sum([has_labels and question is None and not classify, texts is not None, caption, question is not None,
                classify]) != 1:
            raise ValueError("choose exactly one of --labels/--label, --texts, --caption, --question or "
                             "--sentence/--sentences")
        if (question is not None or classify) and not has_labels:
            raise ValueError("--question and --sentence choose among the --labels/--label entries; give them")
        if templates is not None and (question is not None or classify):
            raise ValueError("--templates applies to class names, not to answers or label words")
        if sum([as_json, jsonl, out is not None]) > 1:
            raise ValueError("choose one of --json, --jsonl or --out")
        if out is not None and (out.exists() or out.is_symlink()):
            raise FileExistsError(f"{out} exists; give a new file for --out")
        names = (read_lines(labels, "labels") if labels else []) + list(label or [])
        candidates = read_lines(texts, "texts") if texts else []
        template_list = read_lines(templates, "templates") if templates else None
        onnx = model is not None and is_onnx_folder(model)
        if onnx and preset is not None:
            raise ValueError("--preset does not apply to an exported ONNX folder: the graphs fix the model")
        if onnx and device not in ("auto", "cpu"):
            raise ValueError(f"--device {device}: the ONNX runtime here runs on the CPU")
        if classify:
            if files or files_from is not None:
                raise ValueError("--sentence/--sentences classify sentences; give no files with them")
            prompts = list(sentence or []) + (read_lines(sentences, "sentences") if sentences else [])
            net = model if onnx else load_any_model(model, preset, pick_device(device))
            classify_batch = sentence_answerer(net, names, PROMPT_LEN, routing_task)
            work = (classify_batch(batch, top_k) for batch in _batches(iter(prompts), batch_size))
            total = len(prompts)
        else:
            paths, total = _inputs(list(files or []), files_from)
            if onnx:
                answer, read = onnx_answerer(model, names, template_list, candidates, vocabulary.value, beam_size,
                                             max_len, question)
            else:
                dev = pick_device(device)
                answer, read = torch_answerer(load_any_model(model, preset, dev), dev, names, template_list,
                                              candidates, vocabulary.value, beam_size, max_len, routing_task, question)
            work = (_answer_batch(batch, answer, read, num_frames, top_k) for batch in _batches(paths, batch_size))
        lines = out is not None or jsonl  # one JSON line per file as each batch is done
        opened = None  # --out: created with the first batch's lines, so a run that answers nothing leaves no file
        results, answered, skipped = [], 0, 0
        try:
            with terminal_progress("predict", err_console) as progress:  # files done, time left
                task = progress.add_task("predict", total=total)
                for rows in work:
                    skipped += sum("error" in row for row in rows)
                    answered += len(rows)
                    progress.advance(task, len(rows))
                    if not lines:
                        for row in rows:
                            if "error" in row:
                                err_console.print(f"[red]skipped:[/red] {escape(row['error'])}", highlight=False,
                                                  soft_wrap=True)
                        results.extend(row for row in rows if "error" not in row)
                        continue
                    if out is not None and opened is None:
                        opened = out.open("x", encoding="utf-8")
                    stream = opened or sys.stdout
                    stream.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
                    stream.flush()
        finally:
            if opened is not None:
                opened.close()
        if not answered:
            raise ValueError("no sentences were given" if classify else "no image or video files were given")
    if not lines:
        _show(results, as_json)
    if skipped:
        raise typer.Exit(1)


def _answer_batch(batch: list[Path], answer: Answer, read: Read, num_frames: int, top_k: int) -> list[dict]:
    """One row per file of ``batch``: its answer, or the reason it could not be read."""
    rows: list[dict] = []
    inputs, read_rows = [], []
    for path in batch:
        try:
            inputs.append(read(path, num_frames))
        except (ValueError, OSError) as e:  # OSError: a listed file that does not exist or cannot be opened
            rows.append({"file": str(path), "error": " ".join(str(e).split())})
            continue
        row = {"file": str(path)}
        rows.append(row)
        read_rows.append(row)
    for row, found in zip(read_rows, answer(inputs, top_k) if inputs else [], strict=True):
        row.update(found)
    return rows


def _show(results: list[dict], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(results, indent=2, ensure_ascii=False))
        return
    table = Table("prediction")
    table.columns.insert(0, Column("file", overflow="fold"))  # a path folds onto more lines, never cut
    if results and "sentence" in results[0]:
        table.columns[0].header = "sentence"
    for row in results:
        if "caption" in row:
            table.add_row(row["file"], row["caption"])
        else:
            value = next(k for k in row["top"][0] if k != "text")
            table.add_row(row.get("file", row.get("sentence")), "\n".join(f"{e['text']}  {e[value]:.3f}"
                                                                           for e in row["top"]))
    Console().print(table)
