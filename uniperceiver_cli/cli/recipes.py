"""``uniperceiver recipes``: list, show, copy and validate the training recipes (YAML files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import typer
import yaml
from rich.console import Console
from rich.table import Column, Table

from uniperceiver_cli.cli.common import complete_recipe, report, user_errors
from uniperceiver_cli.train.catalogue import RECIPES_DIR, file_problems, load_checked, resolve_recipe, shipped_names

if TYPE_CHECKING:
    from uniperceiver_cli.train.plan import RecipePlan

GIB = 2**30

app = typer.Typer(help="The shipped training recipes: list, show, copy to edit, validate, plan memory.",
                  no_args_is_help=True, add_completion=False)


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
    recipe: str = typer.Argument(..., help="A shipped recipe's name or a YAML file.", autocompletion=complete_recipe),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides: train.lr=3e-4 tasks.0.batch_size=64"),
) -> None:
    """Print the resolved recipe (defaults filled in, overrides applied) as YAML."""
    with user_errors():
        resolved = load_checked(recipe, overrides)
    plain = json.loads(json.dumps(resolved.to_dict()))  # tuples -> lists, for safe_dump
    typer.echo(yaml.safe_dump(plain, sort_keys=False), nl=False)


@app.command("cp")
def copy(
    recipe: str = typer.Argument(..., help="A shipped recipe's name.", autocompletion=complete_recipe),
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


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f}"


def plan_table(plan: RecipePlan) -> Table:
    """Per task: batch, target rows (encoded by this process / in the set), what its forward saves (the target
    set's share, the whole) and what the backward adds, and its loader's host memory."""
    table = Table(Column("task", no_wrap=True), Column("type", no_wrap=True), Column("batch", justify="right"),
                  Column("target rows", justify="right"), Column("target set GiB", justify="right"),
                  Column("activations GiB", justify="right"), Column("+ backward GiB", justify="right"),
                  Column("host GiB", justify="right"),
                  title=f"{plan.recipe}: {plan.gpus} GPU(s), {plan.engine} ZeRO {plan.zero_stage}, {plan.precision}, "
                        f"split_targets {plan.split_targets}")
    for task in plan.tasks:
        rows = f"{task.encoded_rows:,} / {task.target_rows:,}" if task.encoded_rows != task.target_rows \
            else f"{task.target_rows:,}"
        table.add_row(task.name, task.type, str(task.batch_size), rows, _gib(task.target_set), _gib(task.activations),
                      _gib(task.backward), _gib(task.loader))
    return table


def plan_summary(plan: RecipePlan, gpu_memory: float) -> list[str]:
    """The model states, the largest task and the total against the GPU's memory, one line each."""
    s, largest = plan.states, plan.largest
    verdict = "fits" if plan.fits(gpu_memory * GIB) else "does NOT fit"
    return [f"model states: {s.parameters:,} parameters ({s.trainable:,} trained): weights {_gib(s.weights)} + "
            f"gradients {_gib(s.gradients)} + optimizer {_gib(s.optimizer)} = {_gib(s.total)} GiB",
            f"largest task: {largest.name}: {_gib(largest.activations)} GiB saved (target set "
            f"{_gib(largest.target_set)}) + {_gib(largest.backward)} GiB in the backward",
            f"CUDA context and workspaces (allowance): {_gib(plan.runtime)} GiB",
            f"peak per process: {_gib(plan.total)} GiB: {verdict} {gpu_memory:g} GiB",
            f"loader batches in host memory per process: {_gib(plan.host)} GiB"]


@app.command("plan")
def plan(
    recipe: str = typer.Argument(..., help="A shipped recipe's name or a YAML file.", autocompletion=complete_recipe),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides: train.split_targets=0 "
                                                               "tasks.0.batch_size=64"),
    gpus: int | None = typer.Option(None, "--gpus", min=1,
                                    help="Processes (one per GPU). Default: the count the recipe's description "
                                         "names (\"on 64 GPUs\"), else 1."),
    gpu_memory: float = typer.Option(80.0, "--gpu-memory", min=0.0, help="GiB of memory per GPU."),
) -> None:
    """Predict the peak GPU memory per process of a recipe (model states + the largest task's step, traced with
    fake tensors: nothing is allocated); exit code 2 when it does not fit --gpu-memory."""
    from uniperceiver_cli.train.plan import plan_recipe  # torch: only for this command

    with user_errors():
        result = plan_recipe(load_checked(recipe, overrides), gpus)
    Console().print(plan_table(result))
    for line in plan_summary(result, gpu_memory):
        typer.echo(line)
    for note in sorted({f"{task.name}: {note}" for task in result.tasks for note in task.notes}):
        typer.echo(f"note: {note}")
    if not result.fits(gpu_memory * GIB):
        report(f"{result.recipe}: {_gib(result.total)} GiB per process does not fit {gpu_memory:g} GiB (largest "
               f"task {result.largest.name}): add GPUs (ZeRO), lower its batch_size with train.accumulation, or set "
               "train.activation_checkpointing: true")
        raise typer.Exit(2)
