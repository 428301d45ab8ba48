"""The wheel: built from the source tree, installed into a fresh folder without it, it carries the shipped recipes
(`recipes ls`, `recipes show toyworld-tiny` work from there). Shell completion is on and completes recipe names."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from typer.testing import CliRunner

from uniperceiver_cli.cli.app import app

REPO = Path(__file__).resolve().parents[1]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("UNIPERCEIVER_RECIPES", "PYTHONPATH")}
    return env | {"HF_HUB_OFFLINE": "1"} | extra


def test_the_wheel_carries_the_recipes(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building writes build/ and egg-info next to the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("uniperceiver_cli", "recipes"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), "-q"], capture_output=True, text=True, env=_clean_env())
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("uniperceiver-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))
    assert sorted(Path(n).name for n in names if n.startswith("uniperceiver_cli/recipes/")) == shipped
    target = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target),
                                str(wheel), "-q"], capture_output=True, text=True, env=_clean_env())
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"  # not the source tree: nothing can be found next to the sources
    elsewhere.mkdir()
    env = _clean_env(PYTHONPATH=str(target), COLUMNS="400")  # no wrapping in the listing's title

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "uniperceiver_cli", *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    where = subprocess.run([sys.executable, "-c", "import uniperceiver_cli; print(uniperceiver_cli.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True).stdout
    assert Path(where.strip()).is_relative_to(target)
    listing = cli("recipes", "ls")
    assert all(name.removesuffix(".yaml") in listing for name in shipped)
    assert str(target / "uniperceiver_cli" / "recipes") in listing.replace("\n", "")
    assert "name: toyworld-tiny" in cli("recipes", "show", "toyworld-tiny")


def test_shell_completion_is_on_and_completes_recipe_names() -> None:
    runner = CliRunner()
    script = runner.invoke(app, ["--show-completion", "bash"])
    assert script.exit_code == 0 and "_UNIPERCEIVER_COMPLETE=complete_bash" in script.output
    env = {"_UNIPERCEIVER_COMPLETE": "complete_bash", "COMP_WORDS": "uniperceiver pretrain --recipe toyworld-tiny-p",
           "COMP_CWORD": "3"}
    done = runner.invoke(app, [], env=env, prog_name="uniperceiver")
    assert set(done.output.split()) == {f"toyworld-tiny-prompt-tune-{task}" for task in
                                        ("image-caption", "motion", "video-caption", "video-retrieval")}
