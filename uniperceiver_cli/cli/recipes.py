"""``uniperceiver recipes``: list, show, copy and validate the training recipes (YAML files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.table import Column, Table

from uniperceiver_cli.cli.common import report, user_errors
from uniperceiver_cli.train.catalogue import RECIPES_DIR, file_problems, load_checked, resolve_recipe, shipped_names

app = typer.Typer(help="The shipped training recipes: list, show, copy to edit, validate.", no_args_is_help=True,
                  add_completion=False)


@app.command("ls")
def list_recipes() -> None:
    """List the shipped recipes: name, stage, number of tasks and description."""
    with user_errors():
        recipes = [load_checked(name) for name in shipped_names()]
    table = Table(Column("name", no_wrap=True), Column("stage", no_wrap=True), Column("tasks", justify="right"),
                  "description", title=f"Recipes in {RECIPES_DIR}")
    for recipe in recipes:
        table.add_row(recipe.name, recipe.stage, str(len(recipe.tasks)), recipe.description)
    Console().print(table)


@app.command("show")
def show(
    recipe: str = typer.Argument(..., help="A shipped recipe's name or a YAML file."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides: train.lr=3e-4 tasks.0.batch_size=64"),
) -> None:
    """Print the resolved recipe (defaults filled in, overrides applied) as YAML."""
    with user_errors():
        resolved = load_checked(recipe, overrides)
    plain = json.loads(json.dumps(resolved.to_dict()))  # tuples -> lists, for safe_dump
    typer.echo(yaml.safe_dump(plain, sort_keys=False), nl=False)


@app.command("cp")
def copy(
    recipe: str = typer.Argument(..., help="A shipped recipe's name."),
    dest: Path = typer.Argument(..., help="The file to write, or a folder to write <name>.yaml into."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Copy a shipped recipe (with its comments) to edit it."""
    with user_errors():
        source = resolve_recipe(recipe)
        target = dest / source.name if dest.is_dir() else dest
        if target.exists() and not force:
            raise ValueError(f"{target} exists; pass --force to overwrite it")
        if not target.parent.is_dir():
            raise FileNotFoundError(f"folder {target.parent} does not exist")
        shutil.copyfile(source, target)
    typer.echo(f"wrote {target}")


@app.command("validate")
def validate(
    recipes: list[str] = typer.Argument(..., help="Shipped recipe names or YAML files."),
    check_files: bool = typer.Option(False, "--check-files",
                                     help="Also check init (it exists and fits the model), the DeepSpeed config "
                                          "and every data folder (its manifest serves the task and label set)."),
) -> None:
    """Validate recipes; one line per problem, exit code 2 if there is any."""
    failed = False
    for name in recipes:
        try:
            recipe = load_checked(name)
        except (ValueError, FileNotFoundError) as e:
            report(str(e))
            failed = True
            continue
        problems = file_problems(recipe) if check_files else []
        for problem in problems:
            report(f"{name}: {problem}")
        failed = failed or bool(problems)
        if not problems:
            typer.echo(f"ok {name} (model: {recipe.model_config().num_parameters():,} parameters)")
    if failed:
        raise typer.Exit(2)
