"""Startup time of the commands that need no model, in wall seconds of fresh processes.

Best and median of ``--repeat`` runs, next to a bare Python start and the imports of the CLI's dependencies.

    python benchmarks/startup.py --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def wall_times(command: list[str], repeat: int) -> tuple[float, float]:
    """Best and median seconds of ``repeat`` runs: on a shared machine the best is the least disturbed one."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    python = sys.executable
    cli = str(Path(python).with_name("uniperceiver"))  # the console script next to this interpreter
    with tempfile.TemporaryDirectory() as tmp:
        commands = {
            "python -c pass": [python, "-c", "pass"],
            "python -c 'import typer'": [python, "-c", "import typer"],
            "python -c 'import pydantic, yaml'": [python, "-c", "import pydantic, yaml"],
            "python -c 'import torch'": [python, "-c", "import torch"],
            "uniperceiver --version": [cli, "--version"],
            "uniperceiver --help": [cli, "--help"],
            "uniperceiver recipes ls": [cli, "recipes", "ls"],
            "uniperceiver recipes show toyworld-tiny": [cli, "recipes", "show", "toyworld-tiny"],
            "uniperceiver recipes cp toyworld-tiny": [cli, "recipes", "cp", "toyworld-tiny", tmp, "--force"],
        }
        print(f"{'command':<42}{'best s':>8}{'median s':>10}")
        for name, command in commands.items():
            best, median = wall_times(command, args.repeat)
            print(f"{name:<42}{best:>8.2f}{median:>10.2f}")


if __name__ == "__main__":
    main()
