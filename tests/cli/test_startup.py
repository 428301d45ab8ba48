"""The commands that need no model start without torch, timm or deepspeed (seconds of imports)."""

import subprocess
import sys

import pytest

HEAVY = {"torch", "timm", "deepspeed"}


def heavy_imports(*args: str, cwd=None) -> set[str]:
    """The heavy top-level packages a fresh ``python -m uniperceiver_cli ARGS`` imports (from -X importtime)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "uniperceiver_cli", *args], cwd=cwd,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    names = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    return {name.split(".")[0] for name in names} & HEAVY


def test_the_package_imports_its_api_on_first_use():
    code = ("import sys, uniperceiver_cli as up; print(up.__version__); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'deepspeed')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[1] == "[]", out.stdout

    import uniperceiver_cli as up
    from uniperceiver_cli import load_model
    from uniperceiver_cli.checkpoints.loading import load_model as defined

    assert load_model is defined
    for name in up.__all__:
        getattr(up, name)  # each public name resolves
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        up.nope  # noqa: B018


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["recipes", "ls"], ["recipes", "show", "toyworld-tiny"],
                                  ["recipes", "cp", "toyworld-tiny", "."], ["models"]])
def test_commands_without_a_model_do_not_import_torch(args, tmp_path):
    assert heavy_imports(*args, cwd=tmp_path) == set()
