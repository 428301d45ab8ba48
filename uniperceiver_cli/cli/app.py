"""The ``uniperceiver`` command. Each subcommand lives in its own module and only parses, then calls the library."""

from __future__ import annotations

import typer

from uniperceiver_cli.cli import evaluate, export, models, predict, prepare_data, presets, recipes, train
from uniperceiver_cli.version import __version__

# The help is the root callback's docstring.
app = typer.Typer(name="uniperceiver", no_args_is_help=True, pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"uniperceiver {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Uni-Perceiver and Uni-Perceiver-MoE: one generalist Transformer for images, video and text."""


app.command("presets")(presets.presets)
app.command("models")(models.models)
app.command("evaluate")(evaluate.evaluate)
app.command("predict")(predict.predict)
app.command("export")(export.export)
app.add_typer(prepare_data.app, name="prepare-data")
app.add_typer(recipes.app, name="recipes")
app.command("pretrain")(train.pretrain)
app.command("finetune")(train.finetune)
app.command("prompt-tune")(train.prompt_tune)


def main() -> None:
    app()
