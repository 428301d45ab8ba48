"""An evaluation suite's bookkeeping (``uniperceiver evaluate --suite``): results kept from an earlier run of the
same model and settings, and the summary across the tasks (``summary.csv`` and a table)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from uniperceiver_cli.text_files import read_json

SUMMARY = "summary.csv"
COLUMNS = ("task", "type", "dataset", "split", "samples", "metric", "value", "status", "model_sha256")


def read_result(path: Path, status: str) -> dict[str, Any]:
    """A task's ``results.json``, with how it came to be there ("evaluated" now, or "kept")."""
    return {**read_json(path, "results"), "status": status}


def existing_result(folder: Path, model: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any] | None:
    """The results a task already has in ``folder`` when they are of this model (its weights' sha256; a freshly
    initialised model has none, so is always evaluated) and of the same ``settings`` (the task's, the data root, the
    precision and length penalty); else None. A results file that cannot be read is evaluated again."""
    path = folder / "results.json"
    if model.get("sha256") is None or not path.is_file():
        return None
    try:
        found = read_result(path, "kept")
    except ValueError:
        return None
    same_model = isinstance(found.get("model"), dict) and found["model"].get("sha256") == model["sha256"]
    same_settings = found.get("settings") == json.loads(json.dumps(settings))
    return found if same_model and same_settings else None


def summary_rows(tasks: list[Any], results: dict[str, dict[str, Any]], errors: dict[str, str],
                 model: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task and metric, in the suite's order; a task that failed has one row saying why."""
    rows = []
    for spec in tasks:
        base = {"task": spec.name, "type": spec.type, "model_sha256": model.get("sha256") or ""}
        if spec.name in errors:
            rows.append({**base, "dataset": "", "split": "", "samples": "", "metric": "", "value": "",
                         "status": f"failed: {errors[spec.name]}"})
            continue
        found = results[spec.name]
        data = found.get("data") if isinstance(found.get("data"), dict) else {}
        for metric, value in (found.get("metrics") or {}).items():
            rows.append({**base, "dataset": data.get("dataset", ""), "split": data.get("split", ""),
                         "samples": found.get("num_samples", ""), "metric": metric, "value": value,
                         "status": found["status"]})
    return rows


def write_summary(out: Path, rows: list[dict[str, Any]]) -> Path:
    """``OUT/summary.csv``, written under a temporary name and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tmp = out / (SUMMARY + ".tmp")
    tmp.write_text(buffer.getvalue(), encoding="utf-8")
    os.replace(tmp, out / SUMMARY)
    return out / SUMMARY


def print_summary(rows: list[dict[str, Any]], title: str, console: Console | None = None) -> None:
    table = Table(title=title)
    for column in ("task", "dataset", "metric", "value", "samples", "status"):
        table.add_column(column, justify="right" if column in ("value", "samples") else "left")
    for row in rows:
        value = row["value"]
        table.add_row(row["task"], f"{row['dataset']}/{row['split']}" if row["dataset"] else "", row["metric"],
                      f"{value:.2f}" if isinstance(value, float) else str(value), str(row["samples"]), row["status"])
    (console or Console()).print(table)
