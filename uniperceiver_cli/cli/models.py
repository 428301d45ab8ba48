"""``uniperceiver models``: the released checkpoints, by the names ``--model`` and ``load_model`` take."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from uniperceiver_cli.checkpoints import pretrained
from uniperceiver_cli.checkpoints.pretrained import CHECKSUMS_NOTE, HUB_PREFIX, MODELS_ENV, find_pretrained, models_dirs


def models(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the released checkpoints: name, preset, size, file names, and whether the file is downloaded here."""
    rows = []
    for entry in pretrained.PRETRAINED:
        found = find_pretrained(entry)
        rows.append({"name": entry.name, "preset": entry.preset, "parameters": entry.parameters,
                     "formats": entry.formats, "files": list(entry.candidates()), "sha256": entry.sha256,
                     "url": entry.url, "found": None if found is None else str(found)})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Released checkpoints (--model NAME, up.load_model(NAME))")
    for column in ("name", "preset", "parameters", "formats", "file", "downloaded"):
        table.add_column(column, no_wrap=column != "file")
    for row in rows:
        table.add_row(row["name"], row["preset"], row["parameters"], row["formats"], "\n".join(row["files"]),
                      row["found"] or "no")
    console = Console()
    console.print(table)
    console.print(f"Looked in: {', '.join(str(folder) for folder in models_dirs())} (set {MODELS_ENV} for another "
                  f"folder). Download links: uniperceiver models --json. sha256: {CHECKSUMS_NOTE}, so a file is "
                  f"checked by loading it. Bundles on the Hugging Face Hub load as {HUB_PREFIX}ORG/NAME.",
                  highlight=False)
