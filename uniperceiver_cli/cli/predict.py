"""``uniperceiver predict``: labels, matching texts or captions for your own image and video files."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

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
from uniperceiver_cli.predict import onnx_answerer, torch_answerer


def _collect(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES))
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    if not files:
        raise ValueError("no image or video files found in " + ", ".join(map(str, paths)))
    return files


def predict(
    files: list[Path] = typer.Argument(..., help="Image and video files, or folders of them."),
    model: Path | None = typer.Option(None, "--model", help=MODEL_HELP),
    preset: str | None = typer.Option(None, help="Model preset: the shape of an official file, or a fresh model."),
    labels: Path | None = typer.Option(None, help="Class names, one per line: print the top-k labels."),
    label: list[str] | None = typer.Option(None, help="A class name (repeat the option for several)."),
    templates: Path | None = typer.Option(None, help="Prompt templates for the labels, with {} for the name."),
    texts: Path | None = typer.Option(None, help="Candidate texts, one per line: print the best matches."),
    caption: bool = typer.Option(False, "--caption", help="Generate a caption for each file."),
    top_k: int = typer.Option(5, min=1),
    beam_size: int = typer.Option(2, min=1),
    max_len: int = typer.Option(21, min=1),
    vocabulary: Vocabulary = typer.Option(
        Vocabulary.trained, help="Captions: decode over the tokens the model's caption task trained on (trained; all "
        "when the bundle records none) or all 49,411 (full)."),
    num_frames: int = typer.Option(8, min=1, help="Frames sampled evenly over each video."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
    routing_task: str | None = typer.Option(None, "--routing-task", help="Task-routed MoE models: the training "
                                            "task whose experts to use."),
) -> None:
    """Zero-shot labels (--labels/--label), best-matching texts (--texts) or captions (--caption) for files.
    --model DIR/onnx runs an exported model on onnxruntime, without importing PyTorch."""
    from uniperceiver_cli.onnx.runtime import is_onnx_folder
    from uniperceiver_cli.text_files import read_lines

    with user_errors(), one_line_warnings():
        if sum([labels is not None or bool(label), texts is not None, caption]) != 1:
            raise ValueError("choose exactly one of --labels/--label, --texts or --caption")
        paths = _collect(files)
        names = (read_lines(labels, "labels") if labels else []) + list(label or [])
        candidates = read_lines(texts, "texts") if texts else []
        template_list = read_lines(templates, "templates") if templates else None
        if model is not None and is_onnx_folder(model):
            if preset is not None:
                raise ValueError("--preset does not apply to an exported ONNX folder: the graphs fix the model")
            if device not in ("auto", "cpu"):
                raise ValueError(f"--device {device}: the ONNX runtime here runs on the CPU")
            answer, read = onnx_answerer(model, names, template_list, candidates, vocabulary.value, beam_size, max_len)
        else:
            dev = pick_device(device)
            answer, read = torch_answerer(load_any_model(model, preset, dev), dev, names, template_list, candidates,
                                          vocabulary.value, beam_size, max_len, routing_task)
        results = []
        for path in paths:
            try:
                inputs = read(path, num_frames)
            except (ValueError, FileNotFoundError) as e:
                err_console.print(f"[red]skipped:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
                continue
            results.append({"file": str(path), **answer(inputs, top_k)})
    _show(results, as_json)
    if len(results) < len(paths):  # a file was skipped
        raise typer.Exit(1)


def _show(results: list[dict], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(results, indent=2, ensure_ascii=False))
        return
    table = Table("file", "prediction")
    for row in results:
        if "caption" in row:
            table.add_row(row["file"], row["caption"])
        else:
            value = next(k for k in row["top"][0] if k != "text")
            table.add_row(row["file"], "\n".join(f"{e['text']}  {e[value]:.3f}" for e in row["top"]))
    Console().print(table)
