"""Results people can check: a console table, results.json, predictions.jsonl, COCO caption results."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

from uniperceiver_cli.evaluate.runners import EvalResult


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(out: str | Path, result: EvalResult, *, data: dict[str, Any], model: dict[str, Any],
                  settings: dict[str, Any]) -> Path:
    """Write ``results.json`` (metrics, data set, split, sample count, model identity, settings),
    ``predictions.jsonl`` (one line per sample) and, for captioning, ``captions_coco.json`` in the COCO
    result format (``image_id`` is the sample key)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"task": result.task, "metrics": result.metrics, "num_samples": result.num_samples, "data": data,
               "model": model, "settings": settings, "notes": result.notes}
    _atomic_write(out / "results.json", json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result.predictions)
    _atomic_write(out / "predictions.jsonl", lines)
    if result.predictions and "caption" in result.predictions[0]:
        coco = [{"image_id": p["key"], "caption": p["caption"]} for p in result.predictions]
        _atomic_write(out / "captions_coco.json", json.dumps(coco, ensure_ascii=False) + "\n")
    return out / "results.json"


def print_results(result: EvalResult, title: str, console: Console | None = None) -> None:
    # A title wraps to the table's width, and this table is narrow: at least as wide as the title, it keeps
    # words such as "image_classification" whole (rich folds a word longer than the width mid-word).
    table = Table(title=title, min_width=cell_len(title))
    table.add_column("metric", no_wrap=True)
    table.add_column("value", justify="right")
    for name, value in result.metrics.items():
        table.add_row(name, f"{value:.2f}")
    table.add_row("samples", str(result.num_samples))
    console = console or Console()
    console.print(table)
    for note in result.notes:
        console.print(f"[dim]{note}[/dim]")
