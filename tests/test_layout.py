"""The package's import rules (docs/architecture.md): imports run one way, from the command line down to the model.

Each room has a layer; a module imports only rooms of a lower layer, and its own. ``model/`` is the network only: no
``torch.distributed`` and no DeepSpeed anywhere below it (collectives reach it through ``ExpertGroup``). No module
imports the package root (``uniperceiver_cli/__init__.py`` is the public API, for users)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "uniperceiver_cli"
LAYERS = {
    "text_files": 0, "task_types": 0, "version": 0, "random_state": 0, "progress": 0,
    "model": 1,
    "data": 2, "parallel": 2, "checkpoints": 2,
    "evaluate": 3, "onnx": 3,
    "export": 4, "predict": 4, "train": 4,
    "cli": 5, "__main__": 6,
}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def _room(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports (at the top, inside a function, relative, or by name through ``importlib``), and
    every ``torch.distributed`` attribute it reaches, with its line."""
    package = ".".join(("uniperceiver_cli", *path.relative_to(PACKAGE).parent.parts))
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the file's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and ast.unparse(node.func) in ("import_module",
                                                                                     "importlib.import_module",
                                                                                     "__import__"):
            found.append((node.lineno, node.args[0].value))
        elif isinstance(node, ast.Attribute) and ast.unparse(node).startswith("torch.distributed"):
            found.append((node.lineno, "torch.distributed"))
    return found


def test_every_room_has_a_layer():
    assert {_room(p) for p in _modules()} <= set(LAYERS)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_down_the_layers(path: Path):
    room = _room(path)
    wrong = []
    for line, name in _imports(path):
        parts = name.split(".")
        if parts[0] != "uniperceiver_cli":
            if room == "model" and (name.startswith(("torch.distributed", "deepspeed"))):
                wrong.append(f"line {line}: {name} (the model does no collectives)")
            continue
        target = parts[1] if len(parts) > 1 else ""
        if target not in LAYERS:  # `from uniperceiver_cli import __version__`, `import uniperceiver_cli`
            wrong.append(f"line {line}: {name} (the package root)")
        elif target != room and LAYERS[target] >= LAYERS[room]:
            wrong.append(f"line {line}: {name} ({target} is not below {room})")
        elif "engines" in path.parts and name.startswith("uniperceiver_cli.train.loop"):
            wrong.append(f"line {line}: {name} (an engine imports the protocol, not the loop)")
    assert not wrong, f"{path.relative_to(PACKAGE)}: " + "; ".join(wrong)


def test_pyproject_lists_every_package():
    import tomllib

    listed = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = {".".join(("uniperceiver_cli", *p.parent.relative_to(PACKAGE).parts)) for p in PACKAGE.rglob("__init__.py")}
    assert set(listed) == found | {"uniperceiver_cli.recipes"}  # and the shipped recipes (package-dir)
