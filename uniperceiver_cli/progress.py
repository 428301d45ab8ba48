"""The progress bar of ``evaluate`` and ``predict``: the items done, the time taken and the time left, drawn on the
console's stream (stderr) only where it is a terminal, so nothing goes into a log; stdout is left to the output."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def terminal_progress(label: str, console: Console) -> Progress:
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal, redirect_stdout=False, redirect_stderr=False)
