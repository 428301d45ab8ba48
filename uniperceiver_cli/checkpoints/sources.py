"""Where a checkpoint's weights are and what kind it is: a bundle, a run directory, either engine's training
checkpoint (a DeepSpeed one's expert shards stacked), or an official file; read, never executed (:mod:`.safe_load`)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from uniperceiver_cli.checkpoints import runs
from uniperceiver_cli.checkpoints.bundle import BUNDLE_CONFIG, BUNDLE_WEIGHTS, read_safetensors, recover_export
from uniperceiver_cli.checkpoints.errors import CheckpointError
from uniperceiver_cli.checkpoints.official import key_naming
from uniperceiver_cli.checkpoints.pretrained import resolve_model
from uniperceiver_cli.checkpoints.safe_load import CHECKPOINT_GLOBALS, torch_load

# What ``load_model`` and ``uniperceiver export`` accept, told apart in two steps: where the weights sit (a
# folder's layout, a file's container) and, for a torch file, whose naming its keys follow.
KIND_LABELS = {"bundle": "bundle", "run": "run directory", "state": "single-engine training state",
               "deepspeed": "DeepSpeed checkpoint", "official": "official checkpoint"}
DEEPSPEED_MODEL = "mp_rank_00_model_states.pt"
_OPTIM_RANK = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def classify_container(obj: Any, path: Path) -> tuple[str, dict[str, torch.Tensor], str | None]:
    """The kind of a loaded torch file ("state", "deepspeed" or "official"), its state dict and, for an
    official one, its format ("torch" or "ds").

    DeepSpeed's container (``{'module': ...}``) holds our own checkpoints as well as the reference's "ds" files:
    ours carry the loop's state under ``uniperceiver`` and our key names; only the reference's naming is
    renamed. A file that mixes the two, or follows neither, is refused."""
    if isinstance(obj, dict) and isinstance(obj.get("module"), dict):
        naming = key_naming(obj["module"])
        if runs.CLIENT_KEY in obj or naming == "ours":
            if naming != "ours":
                raise CheckpointError(f"{path} carries this toolkit's training state but its module keys are not "
                                      f"this toolkit's names")
            return "deepspeed", obj["module"], None
        if naming == "reference":
            return "official", obj["module"], "ds"
        raise CheckpointError(f"{path} holds a DeepSpeed module whose keys are neither this toolkit's nor the "
                              f"reference's names")
    state = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if isinstance(state, dict) and state and (state is not obj or all(torch.is_tensor(v) for v in obj.values())):
        naming = key_naming(state)
        if naming == "ours":
            return "state", state, None
        if naming == "reference":
            return "official", state, "torch"
        raise CheckpointError(f"{path} holds a state dict whose keys are neither this toolkit's nor the reference's "
                              f"names")
    raise CheckpointError(f"{path} holds no state dict under 'model' or 'module'")


def read_official(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Load an official file; returns its state dict and its format, "torch" or "ds".

    The container is told apart by its keys' naming: a file written by this toolkit (a single-engine
    ``state.pt`` or its DeepSpeed checkpoint, whose keys are already ours) is refused, never renamed."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    obj = torch_load(path, allowed=CHECKPOINT_GLOBALS, deepspeed=True)
    kind, state, fmt = classify_container(obj, path)
    if kind != "official":
        raise CheckpointError(f"{path} is a {KIND_LABELS[kind]} written by this toolkit, not an official checkpoint "
                              f"(its keys are already ours)")
    return state, fmt


@dataclass
class Source:
    """A checkpoint of any kind, located and read (:func:`find_source`).

    Attributes:
        kind: "bundle", "state", "deepspeed" or "official" (a run directory resolves to one of them).
        path: the folder or file holding the weights; ``weights`` the main weights file (hashed for provenance).
        run_dir: the run directory it belongs to, when known (it records the model config).
        given: the path as given, when it was a run directory.
    """

    kind: str
    path: Path
    weights: Path
    run_dir: Path | None = None
    given: Path | None = None
    step: int | None = None
    format: str | None = None  # official: "torch" or "ds"
    zero_stage: int | None = None
    processes: int | None = None
    expert_parallel: int | None = None  # a DeepSpeed checkpoint whose experts were sharded over this many ranks
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def describe(self) -> str:
        """One line: what kind of source it is and where, e.g. ``deepspeed checkpoint (ZeRO 2, 2 processes,
        step 4) runs/x/checkpoints/step-0000004``."""
        details = [text for present, text in (
            (self.kind == "official", f'"{self.format}" format'),
            (self.zero_stage is not None, f"ZeRO {self.zero_stage}"),
            (self.processes is not None, f"{self.processes} process{'es' if self.processes != 1 else ''}"),
            (self.expert_parallel is not None, f"experts over {self.expert_parallel} ranks, stacked"),
            (self.step is not None, f"step {self.step}")) if present]
        label = {"deepspeed": "deepspeed checkpoint", "state": "single-engine checkpoint"}.get(
            self.kind, "final bundle" if self.given is not None else KIND_LABELS[self.kind])
        line = label + (f" ({', '.join(details)})" if details else "") + f" {self.path}"
        return f"run directory {self.given}: {line}" if self.given is not None else line


def _folder_kind(path: Path) -> str | None:
    if (path / BUNDLE_CONFIG).is_file() or (path / BUNDLE_WEIGHTS).is_file():
        return "bundle"
    if (path / runs.STATE_FILE).is_file():
        return "state"
    if (path / runs.DEEPSPEED_DIR).is_dir() or (path / DEEPSPEED_MODEL).is_file() or (path / "latest").is_file() \
            or (path / runs.DEEPSPEED_TAG / DEEPSPEED_MODEL).is_file():
        return "deepspeed"
    if runs.is_run(path):
        return "run"
    return None


def _deepspeed_folder(path: Path) -> Path:
    """The folder holding ``mp_rank_00_model_states.pt``, from a step folder, its ``deepspeed/`` or the tag."""
    folder = path / runs.DEEPSPEED_DIR if (path / runs.DEEPSPEED_DIR).is_dir() else path
    if (folder / DEEPSPEED_MODEL).is_file():
        return folder
    latest = folder / "latest"
    tags = [runs.read_side_file(latest).decode("utf-8", errors="replace").strip()] if latest.is_file() else []
    for tag in [*tags, runs.DEEPSPEED_TAG]:
        if tag not in ("", ".", "..") and "/" not in tag and (folder / tag / DEEPSPEED_MODEL).is_file():
            return folder / tag
    raise CheckpointError(f"{path} is not a complete DeepSpeed checkpoint: no {DEEPSPEED_MODEL} in it")


def _check_ranks(folder: Path, obj: dict[str, Any]) -> tuple[int | None, int]:
    """The ZeRO stage and process count of a DeepSpeed checkpoint; one line if a process's part is missing."""
    processes = obj.get("dp_world_size", 1)
    config = obj.get("ds_config") if isinstance(obj.get("ds_config"), dict) else {}
    optimization = config.get("zero_optimization")
    stage = optimization.get("stage", 0) if isinstance(optimization, dict) else 0
    if not isinstance(processes, int) or processes < 1:
        raise CheckpointError(f"{folder / DEEPSPEED_MODEL} does not record its process count (dp_world_size)")
    if obj.get("mp_world_size", 1) != 1:
        raise CheckpointError(f"{folder}: model-parallel DeepSpeed checkpoints (mp_world_size "
                              f"{obj.get('mp_world_size')}) are not supported")
    ranks = {int(m.group(1)) for m in (_OPTIM_RANK.match(p.name) for p in folder.iterdir()) if m}
    zero = int(stage) if isinstance(stage, int) else 0
    missing = sorted(set(range(processes)) - ranks) if zero >= 1 or ranks else []  # ZeRO 0 may write no parts
    if missing:
        raise CheckpointError(f"{folder} is an incomplete DeepSpeed checkpoint: it was written by {processes} "
                              f"process(es) but the optimizer part of rank(s) {', '.join(map(str, missing))} "
                              f"is missing")
    return zero, processes


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_identity(path: str | Path | None) -> dict[str, Any]:
    """The checkpoint's path and the sha256 of its weights file (a bundle's model.safetensors, a run's or a
    training checkpoint's weights file)."""
    if path is None:
        return {"path": None, "sha256": None, "note": "freshly initialised model"}
    path = resolve_model(path)
    return {"path": str(path.resolve()), "sha256": sha256_of(find_source(path).weights if path.is_dir() else path)}


def find_source(path: str | Path, *, kind: str | None = None, step: int | None = None,
                latest: bool = False) -> Source:
    """Locate and read a checkpoint of any kind; ``kind`` forces one ("bundle", "run", "state", "deepspeed",
    "official"); ``step`` / ``latest`` pick a checkpoint inside a run directory. Bad input raises one line.

    - a bundle folder (or its ``model.safetensors``);
    - a run directory: its ``final/`` bundle, or ``checkpoints/step-N`` with ``step=N`` / ``latest``;
    - the single engine's ``state.pt`` (or its ``checkpoints/step-N`` folder);
    - a DeepSpeed checkpoint of this toolkit, ZeRO 0 to 2, any number of processes (the step folder, its
      ``deepspeed/`` folder, the tag folder or ``mp_rank_00_model_states.pt``); only the module states are read;
    - an official "torch" or "ds" file.

    ``path`` may also name a released checkpoint or an ``hf-hub:`` bundle (:func:`resolve_model`). What an export to
    ``path`` stopped midway left beside it is put right first (:func:`recover_export`).
    """
    path = resolve_model(path)
    if kind is not None and kind not in KIND_LABELS:
        raise CheckpointError(f"unknown source kind {kind!r}; choose one of: {', '.join(KIND_LABELS)}")
    recover_export(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (step is not None or latest) and kind not in (None, "run"):
        raise CheckpointError("--step and --latest pick a checkpoint inside a run directory")
    given = None
    if path.is_dir():
        found = _folder_kind(path)
        if (step is not None or latest or kind == "run") and found != "run":
            raise CheckpointError(f"{path} is not a run directory (no checkpoints/, final/ or config.yaml in it)")
        if found == "run":
            given, path = path, _run_choice(path, step, latest)
            found = _folder_kind(path)
        if found is None or found == "run":
            raise CheckpointError(f"{path} is not a checkpoint: neither a bundle, a run directory, a training "
                                  f"checkpoint (state.pt or deepspeed/) nor an official file")
        if kind not in (None, "run") and found != kind:
            raise CheckpointError(f"{path} is not a {KIND_LABELS[kind]} (it looks like a {KIND_LABELS[found]})")
        if found == "bundle":
            run_dir = runs.final_of(path)
            return Source("bundle", path, path / BUNDLE_WEIGHTS, run_dir=run_dir, given=given,
                          step=_final_step(run_dir))
        file = path / runs.STATE_FILE if found == "state" else _deepspeed_folder(path) / DEEPSPEED_MODEL
        return _file_source(file, kind, given, label=path)
    if path.suffix == ".safetensors":
        if kind not in (None, "bundle") or not (path.parent / BUNDLE_CONFIG).is_file():
            raise CheckpointError(f"{path}: a .safetensors file is read as part of a bundle, and "
                                  f"{path.parent / BUNDLE_CONFIG} is missing")
        return Source("bundle", path.parent, path)
    if kind in ("bundle", "run"):
        raise CheckpointError(f"{path} is a file, not a {KIND_LABELS[kind]} folder")
    return _file_source(path, kind, None, label=path)


def _final_step(run_dir: Path | None) -> int | None:
    train = runs.run_recipe(run_dir).get("train")
    steps = train.get("steps") if isinstance(train, dict) else None
    return steps if isinstance(steps, int) else None


def _run_choice(run_dir: Path, step: int | None, latest: bool) -> Path:
    folders = runs.step_folders(run_dir)
    available = ", ".join(str(runs.step_of(p)) for p in folders) or "none"
    if step is not None:
        chosen = [p for p in folders if runs.step_of(p) == step]
        if not chosen:
            raise CheckpointError(f"run {run_dir} has no checkpoint of step {step} (available: {available})")
        return chosen[0]
    if latest:
        if not folders:
            raise CheckpointError(f"run {run_dir} has no checkpoints")
        return folders[-1]
    if not (run_dir / runs.FINAL_DIR).is_dir():
        raise CheckpointError(f"run {run_dir} has no final/ bundle (not finished); pick a checkpoint with --step N "
                              f"(available: {available}) or --latest")
    return run_dir / runs.FINAL_DIR


def _file_source(file: Path, kind: str | None, given: Path | None, label: Path) -> Source:
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} does not exist")
    obj = torch_load(file, allowed=CHECKPOINT_GLOBALS, deepspeed=True)
    found, state, fmt = classify_container(obj, file)
    if kind not in (None, "run") and found != kind:
        raise CheckpointError(f"{file} is not a {KIND_LABELS[kind]} (it is a {KIND_LABELS[found]})")
    source = Source(found, label, file, run_dir=runs.run_of(file), given=given, format=fmt, state=state)
    if found == "deepspeed":
        source.zero_stage, source.processes = _check_ranks(file.parent, obj)
        source.state, source.expert_parallel = _stack_experts(state, file)
        client = obj.get(runs.CLIENT_KEY)
        recorded = client.get("step") if isinstance(client, dict) else obj.get("global_steps")
        source.step = recorded if isinstance(recorded, int) else None
    elif found == "state" and isinstance(obj.get("step"), int):
        source.step = obj["step"]
    return source


_EXPERT_SHARD = re.compile(r"^rank-(\d{3})-of-(\d{3})\.safetensors$")


def _stack_experts(state: dict[str, torch.Tensor], file: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """An expert-parallel run's DeepSpeed checkpoint: its module states (rank 0's) hold only rank 0's experts, and
    every expert-parallel rank's experts are in ``experts/`` beside the DeepSpeed folder. Stack them in expert
    order; returns the state and the expert-parallel size (None: not expert-parallel)."""
    folder = file.parent.parent.parent / runs.EXPERTS_DIR  # step-N/deepspeed/<tag>/mp_rank_00_model_states.pt
    found = {m.group(1, 2) for m in (_EXPERT_SHARD.match(p.name) for p in folder.iterdir()) if m} \
        if folder.is_dir() else set()
    if not found:
        return state, None
    sizes = {int(size) for _, size in found}
    if len(sizes) != 1:
        raise CheckpointError(f"{folder} mixes expert shards of {len(sizes)} expert-parallel sizes")
    size = sizes.pop()
    missing = sorted(set(range(size)) - {int(rank) for rank, _ in found})
    if missing:
        raise CheckpointError(f"{folder} is incomplete: it was written by {size} expert-parallel ranks but the "
                              f"experts of rank(s) {', '.join(map(str, missing))} are missing")
    shards = [read_safetensors(folder / runs.expert_shard_file(rank, size)) for rank in range(size)]
    keys = set(shards[0])
    if not keys or any(set(shard) != keys for shard in shards):
        raise CheckpointError(f"{folder}: the expert shards do not hold the same tensors")
    state = dict(state)
    for key in sorted(keys):
        parts = [shard[key] for shard in shards]
        if key not in state or parts[0].dim() == 0 or any(p.shape != state[key].shape for p in parts):
            raise CheckpointError(f"{folder}: the expert shards do not fit the checkpoint's {key}")
        state[key] = torch.cat(parts)
    return state, size

