"""The run directory: what a training run writes, and where. The one place that names its parts.

    RUN_DIR/config.yaml                     the resolved recipe (what ran)
    RUN_DIR/model.json                      the model config training built, as data (older runs lack it)
    RUN_DIR/metrics.jsonl, tensorboard/     the run log; RUN_DIR/.lock, held by the run training into it
    RUN_DIR/.shared                         a token of the run's start: every process must read it back
    RUN_DIR/checkpoints/step-NNNNNNN/       a training checkpoint: state.pt (single engine) or deepspeed/ (+ experts/),
                                            and rng/rank-NNNNN.pt, each process's random state
    RUN_DIR/final/                          the final bundle
    RUN_DIR/eval/                           evaluations
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from uniperceiver_cli.checkpoints.errors import CheckpointError
from uniperceiver_cli.model.config import ModelConfig
from uniperceiver_cli.text_files import read_small, read_yaml

CONFIG_FILE = "config.yaml"
MODEL_CONFIG_FILE = "model.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
EVAL_DIR = "eval"
LOCK_FILE = ".lock"  # held (flock) by the process training into the run directory
SHARED_FILE = ".shared"  # written by the main process at each start; the others read it back: same folder?
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
STATE_FILE = "state.pt"  # the single engine's checkpoint inside checkpoints/step-N
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's checkpoint folder inside checkpoints/step-N
DEEPSPEED_TAG = "state"  # the tag of DeepSpeed's checkpoint inside that folder
CLIENT_KEY = "uniperceiver"  # the loop's own state (step, data position) inside DeepSpeed's checkpoint
# Expert parallelism: each expert-parallel rank's experts, beside DeepSpeed's folder inside checkpoints/step-N
EXPERTS_DIR = "experts"
RNG_DIR = "rng"  # each process's random state inside checkpoints/step-N (older checkpoints: rank 0's in the client)
MAX_SIDE_FILE = 8 << 20  # bytes: the most a config.json, config.yaml, model.json or DeepSpeed "latest" is read up to


def expert_shard_file(rank: int, size: int) -> str:
    """The file of expert-parallel rank ``rank`` of ``size`` inside :data:`EXPERTS_DIR`."""
    return f"rank-{rank:03d}-of-{size:03d}.safetensors"


def rng_file(rank: int) -> str:
    """The file of process ``rank``'s random state inside :data:`RNG_DIR`."""
    return f"rank-{rank:05d}.pt"


def step_folder(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS_DIR / f"step-{step:07d}"


def step_of(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def writing_folder(folder: Path) -> Path:
    """Where a checkpoint folder is written before it is renamed into place (never listed as a step folder)."""
    return folder.with_name(f".tmp-{folder.name}")


def step_folders(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first (a folder being written has another name)."""
    folder = run_dir / CHECKPOINTS_DIR
    found = [p for p in folder.glob("step-*") if p.is_dir() and p.name.split("-")[1].isdigit()] \
        if folder.is_dir() else []
    return sorted(found, key=step_of)


def is_run(path: Path) -> bool:
    return (path / CHECKPOINTS_DIR).is_dir() or (path / FINAL_DIR).is_dir() or (path / CONFIG_FILE).is_file()


def run_of(path: Path) -> Path | None:
    """The run directory a checkpoint sits in: the folder above ``checkpoints/`` that holds ``config.yaml``."""
    path = path.resolve()  # "." has no name: a relative step folder must still find its run
    for parent in [path, *path.parents][:6]:
        if parent.name == CHECKPOINTS_DIR and (parent.parent / CONFIG_FILE).is_file():
            return parent.parent
    return None


def final_of(path: Path) -> Path | None:
    """The run directory whose ``final/`` bundle ``path`` is, if it is one."""
    return path.parent if path.name == FINAL_DIR and (path.parent / CONFIG_FILE).is_file() else None


def read_side_file(path: Path) -> bytes:
    """The bytes of a file that sits beside weights (a bundle's ``config.json``, a run's ``config.yaml``), read up to
    :data:`MAX_SIDE_FILE`: a larger one (or a link to an endless device) is refused with one line, unparsed."""
    try:
        return read_small(path, "side file", MAX_SIDE_FILE)
    except ValueError:
        raise CheckpointError(f"{path} is larger than {MAX_SIDE_FILE >> 20} MB, too large for a config; not read"
                              ) from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def run_recipe(run_dir: Path | None) -> dict[str, Any]:
    """The run's resolved recipe (``config.yaml``), or {} when there is none. It is parsed as recipes are (no
    aliases, no duplicate keys), after its size is checked."""
    path = run_dir / CONFIG_FILE if run_dir is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        data = read_yaml(read_side_file(path).decode("utf-8"), str(path), CheckpointError)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def write_model_config(run_dir: Path, config: ModelConfig) -> None:
    """Record the model training built, as data, for export and loading to build the same one."""
    path = run_dir / MODEL_CONFIG_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)


def read_model_config(run_dir: Path | None) -> ModelConfig | None:
    """The model config a run recorded (None: a run written before it was recorded, or no run)."""
    path = run_dir / MODEL_CONFIG_FILE if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        return ModelConfig.from_dict(json.loads(read_side_file(path)))
    except (TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} is not a valid model config: {' '.join(str(e).split())[:300]}") from None
