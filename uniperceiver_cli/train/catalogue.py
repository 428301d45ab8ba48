"""The recipe catalogue: the shipped recipes by name, and the checks of the files a recipe names."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

from uniperceiver_cli.checkpoints.errors import CheckpointError
from uniperceiver_cli.checkpoints.pretrained import resolve_model
from uniperceiver_cli.data.shards import MANIFEST, Manifest, is_split_url
from uniperceiver_cli.task_types import TASKS
from uniperceiver_cli.text_files import shorten
from uniperceiver_cli.train.recipe import EvalSuite, EvalTaskSpec, Recipe, TaskSpec, load_recipe, load_suite

PACKAGE = Path(__file__).resolve().parents[1]


def _recipes_dir() -> Path:
    """Where the shipped recipes are: ``UNIPERCEIVER_RECIPES``; else ``uniperceiver_cli/recipes`` (an installed
    wheel carries them there, pyproject.toml maps the top-level ``recipes/`` into the package); else the source
    checkout's ``recipes/`` (an editable install)."""
    if os.environ.get("UNIPERCEIVER_RECIPES"):
        return Path(os.environ["UNIPERCEIVER_RECIPES"])
    packaged = PACKAGE / "recipes"
    return packaged if packaged.is_dir() else PACKAGE.parent / "recipes"


RECIPES_DIR = _recipes_dir()


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


def load_suite_checked(name_or_path: str) -> EvalSuite:
    """The evaluation tasks of a shipped recipe (by name), a recipe file or a suite file."""
    return load_suite(resolve_recipe(name_or_path))


def _is(path: Path, kind: Literal["folder", "file"]) -> bool:
    """Whether ``path`` is a "folder" or a "file"; False also where the system cannot tell (a name too long)."""
    try:
        return path.is_dir() if kind == "folder" else path.is_file()
    except OSError:
        return False


def file_problems(recipe: Recipe) -> list[str]:
    """One line per problem with the files a recipe names, each naming its key path: a missing ``init`` or one
    that does not fit the recipe's model, a missing DeepSpeed config, a data folder (training, evaluation or
    ``vocabulary_from``) that does not exist or holds no manifest, a task type the split does not serve, a label
    set it does not have, and a missing labels file."""
    problems = []
    if recipe.init and (problem := init_problem(recipe)):
        problems.append(problem)
    deepspeed = recipe.engine.deepspeed_config
    if deepspeed and not _is(Path(deepspeed), "file"):
        problems.append(f"engine.deepspeed_config: {shorten(deepspeed)} does not exist")
    root = Path(recipe.data_root)
    tasks = [(f"{prefix}.{i}", task) for prefix, specs in (("tasks", recipe.tasks),
                                                            ("evaluation.tasks", recipe.evaluation.tasks))
             for i, task in enumerate(specs)]
    keys: dict[Path, list[str]] = {}
    for key, task in tasks:
        if is_split_url(task.data):  # fetched (streaming enabled) and checked here; not a folder
            try:
                problem = task_problem(key, task, Manifest.load(task.data), task.data)
            except (OSError, ValueError) as e:
                problem = f"{key}.data: {e}"
            problems.extend([problem] if problem else [])
        else:
            keys.setdefault(root / task.data, []).append(f"{key}.data")
        if isinstance(task, EvalTaskSpec):
            for j, folder in enumerate(task.vocabulary_from):
                keys.setdefault(root / folder, []).append(f"{key}.vocabulary_from.{j}")
    manifests: dict[Path, Manifest] = {}
    for folder, names in keys.items():
        if not _is(folder, "folder"):
            problems.append(f"{', '.join(names)}: {shorten(str(folder))} does not exist "
                            "(see `uniperceiver prepare-data --help`)")
        elif not _is(folder / MANIFEST, "file"):
            problems.append(f"{', '.join(names)}: {shorten(str(folder))} holds no {MANIFEST} (not a converted split)")
        else:
            try:
                manifests[folder] = Manifest.load(folder)
                manifests[folder].shard_paths(folder)  # each shard lies in the folder (no link out of it)
            except ValueError as e:
                problems.append(f"{', '.join(names)}: {e}")
    for key, task in tasks:
        labels = task.labels if isinstance(task, EvalTaskSpec) else None
        if labels and not _is(root / labels, "file"):
            problems.append(f"{key}.labels: {shorten(str(root / labels))} does not exist")
        manifest = manifests.get(root / task.data)
        if manifest is not None and (problem := task_problem(key, task, manifest, root / task.data)):
            problems.append(problem)
    return problems


def task_problem(key: str, task: TaskSpec | EvalTaskSpec, manifest: Manifest, split: str | Path) -> str | None:
    """What a task asks of its split that the split's manifest does not have, if anything."""
    if task.type not in manifest.tasks:
        return f"{key}.type: {split} serves {', '.join(manifest.tasks) or 'no task'}, not {task.type}"
    if task.label_set is not None:
        try:
            manifest.label_names(task.label_set)
        except ValueError as e:
            return f"{key}.label_set: {e}"
        return None
    named = isinstance(task, EvalTaskSpec) and task.labels  # an evaluation's labels file names the classes
    if TASKS[task.type].family in ("classification", "text_classification") and not manifest.classes and not named:
        return f"{key}: {split} names no classes; set label_set{' or labels' if isinstance(task, EvalTaskSpec) else ''}"
    return None


def init_problem(recipe: Recipe) -> str | None:
    """Why ``init`` cannot start the recipe's model, if it cannot: checked exactly as training loads it."""
    try:
        source = resolve_model(recipe.init)  # a released model's name: its downloaded file
    except CheckpointError as e:
        return f"init: {e}"
    if not (_is(source, "folder") or _is(source, "file")):
        return f"init: {shorten(recipe.init)} does not exist"
    # torch and the model only here: the other recipe commands start without them.
    import torch

    from uniperceiver_cli.train.loop import build_model

    # On the meta device the model has shapes but no storage: even a LARGE model is checked key by key and
    # shape by shape in a moment, without allocating its weights. Copying into it is a no-op torch warns about.
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "for .*: copying from a non-meta parameter", UserWarning)
            build_model(recipe)
    except ValueError as e:  # CheckpointError: unreadable, or keys and shapes that do not fit
        return f"init: {e}"
    return None
