"""benchmarks/gpu_check.py runs every section on the CPU at tiny sizes and prints its table."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--small", "--no-compile"],
                          cwd=REPO, env=env | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.strip("| ").split(" | ") for line in done.stdout.splitlines()[2:]]
    assert all(len(row) == 3 for row in rows), done.stdout
    assert not [row for row in rows if row[1] == "error"], done.stdout
    results = {(section, check): result for section, check, result in rows}
    assert {section for section, _ in results} == {"environment", "attention", "syncs", "memory", "throughput",
                                                    "resume", "deepspeed"}
    assert results[("attention", "images, videos (no mask)")].startswith("flash")
    assert results[("syncs", "tiny-moe token: image classification")] == "4 (census)"
    assert "(plan " in results[("memory", "tiny caption step, batch 2")]
    assert results[("throughput", "ours, eager, batch 4")].endswith("images/s")
    assert results[("resume", "stopped after 3 of 4 steps, resumed")].startswith("losses equal")
    assert results[("deepspeed", "world of one, bf16, ZeRO 1")].startswith("4 steps, last: ")
