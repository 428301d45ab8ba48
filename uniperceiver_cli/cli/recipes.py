"""``uniperceiver recipes``: list, show, copy and validate the training recipes (YAML files)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.table import Table

import uniperceiver_cli
from uniperceiver_cli.cli.common import err_console, user_errors
from uniperceiver_cli.data.shards import MANIFEST
from uniperceiver_cli.train.recipe import Recipe, load_recipe

RECIPES_DIR = Path(os.environ.get("UNIPERCEIVER_RECIPES")
                   or Path(uniperceiver_cli.__file__).resolve().parents[1] / "recipes")

app = typer.Typer(help="The shipped training recipes: list, show, copy to edit, validate.", no_args_is_help=True,
                  add_completion=False)


def shipped_names() -> list[str]:
    """The names of the shipped recipes (``RECIPES_DIR/<name>.yaml``), sorted."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str) -> Path:
    """A shipped recipe's file from its name (``toyworld-tiny``), else the path as given."""
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if Path(name_or_path).name == name_or_path and shipped.is_file():
        return shipped
    path = Path(name_or_path)
    if path.is_file():
        return path
    raise FileNotFoundError(f"no recipe {name_or_path!r}: not a file and not a shipped recipe "
                            f"({', '.join(shipped_names()) or f'none in {RECIPES_DIR}'})")


def load_checked(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """A shipped recipe (by name) or a recipe file, validated, with dotted overrides."""
    return load_recipe(resolve_recipe(name_or_path), overrides)


def missing_files(recipe: Recipe) -> list[str]:
    """One line per missing file: the initial weights, and each data folder (with the keys naming it)
    that does not exist or holds no manifest."""
    problems = []
    if recipe.init and not Path(recipe.init).exists():
        problems.append(f"init: {recipe.init} does not exist")
    keys: dict[Path, list[str]] = {}
    for prefix, tasks in (("tasks", recipe.tasks), ("evaluation.tasks", recipe.evaluation.tasks)):
        for i, task in enumerate(tasks):
            keys.setdefault(Path(recipe.data_root) / task.data, []).append(f"{prefix}.{i}.data")
    for folder, names in keys.items():
        if not folder.is_dir():
            problems.append(f"{', '.join(names)}: {folder} does not exist (see `uniperceiver prepare-data --help`)")
        elif not (folder / MANIFEST).is_file():
            problems.append(f"{', '.join(names)}: {folder} holds no {MANIFEST} (not a converted split)")
    return problems


@app.command("ls")
def list_recipes() -> None:
    """List the shipped recipes: name, stage, number of tasks and description."""
    with user_errors():
        recipes = [load_checked(name) for name in shipped_names()]
    table = Table(title=f"Recipes in {RECIPES_DIR}")
    table.add_column("name", no_wrap=True)
    table.add_column("stage", no_wrap=True)
    table.add_column("tasks", justify="right")
    table.add_column("description")
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
                                     help="Also check that init and every data folder (with its manifest) exist."),
) -> None:
    """Validate recipes; one line per problem, exit code 2 if there is any."""
    failed = False
    for name in recipes:
        try:
            recipe = load_checked(name)
        except (ValueError, FileNotFoundError) as e:
            err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            failed = True
            continue
        problems = missing_files(recipe) if check_files else []
        for problem in problems:
            err_console.print(f"[red]error:[/red] {name}: {problem}", highlight=False, soft_wrap=True)
        failed = failed or bool(problems)
        if not problems:
            typer.echo(f"ok {name}")
    if failed:
        raise typer.Exit(2)
