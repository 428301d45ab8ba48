"""What the subcommands share: turning user mistakes into one red line and exit code 2."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    import torch

err_console = Console(stderr=True)

MODEL_HELP = ("A bundle, run, training checkpoint or .pth file, a released model by name (uniperceiver models) or "
              "hf-hub:ORG/NAME.")
USER_ERRORS = (ValueError, OSError, KeyError)  # OSError: a missing file, a folder that cannot be written, ...


def report(message: str, label: str = "[red]error:[/red]") -> None:
    """One line on stderr (a YAML error quotes brackets and spans lines: escaped and joined)."""
    err_console.print(f"{label} {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A mistake in the user's input (bad file, bad option, bad layout) ends the command with one line."""
    try:
        yield
    except USER_ERRORS as e:
        report(str(e.args[0] if isinstance(e, KeyError) and e.args else e))
        raise typer.Exit(2) from None


def pick_device(name: str) -> torch.device:
    import torch  # here, not at the top: commands that need no model (--help, recipes) start without it

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


def load_any_model(model: Path | None, preset: str | None, device: torch.device):  # noqa: ANN201
    """A bundle or official checkpoint, or a freshly initialised preset when no checkpoint is given."""
    from uniperceiver_cli.checkpoints.loading import load_model
    from uniperceiver_cli.model.config import get_config
    from uniperceiver_cli.model.uniperceiver import UniPerceiver

    if model is None:
        if preset is None:
            raise ValueError("give --model PATH (a bundle, run, training checkpoint or official file) or --preset NAME")
        return UniPerceiver(get_config(preset)).eval().to(device)
    return load_model(model, preset=preset).to(device)


class Vocabulary(str, Enum):
    """What captions decode over: the tokens the model's caption task trained on, or all of them."""

    trained = "trained"
    full = "full"


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Show each warning raised inside (a suspect checkpoint, partly matching labels) as one line on stderr;
    Python's default display adds the file, line and source of the call."""
    def show(message: Warning | str, *_: object) -> None:
        report(str(message), "[yellow]warning:[/yellow]")

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def complete_recipe(incomplete: str) -> list[str]:
    """Shell completion of a shipped recipe's name (``uniperceiver --install-completion`` turns it on)."""
    from uniperceiver_cli.train.catalogue import shipped_names

    return [name for name in shipped_names() if name.startswith(incomplete)]
