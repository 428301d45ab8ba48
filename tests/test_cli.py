"""The command line: version, help and the presets table."""

import subprocess
import sys

from typer.testing import CliRunner

from uniperceiver_cli import __version__
from uniperceiver_cli.cli.app import app

runner = CliRunner()


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"uniperceiver {__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "presets" in result.output


def test_presets_lists_every_preset_with_its_size():
    result = runner.invoke(app, ["presets"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "124,604,934" in result.output and "1,413,535,750" in result.output
    for name in ("tiny", "tiny-moe", "small", "base", "large", "base-moe", "large-moe"):
        assert f" {name} " in result.output


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "uniperceiver_cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"uniperceiver {__version__}"
