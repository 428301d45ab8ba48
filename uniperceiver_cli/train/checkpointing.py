"""A run's checkpointing: the run directory's lock, resuming, RNG state, writing checkpoints (with rotation) and
the final bundle, and the checks that stop a run whose weights are no longer finite."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from uniperceiver_cli.checkpoints.bundle import save_bundle
from uniperceiver_cli.checkpoints.errors import CheckpointError
from uniperceiver_cli.checkpoints.runs import (
    DEEPSPEED_DIR,
    FINAL_DIR,
    LOCK_FILE,
    METRICS_FILE,
    RNG_DIR,
    SHARED_FILE,
    STATE_FILE,
    rng_file,
    step_folder,
    step_folders,
    writing_folder,
)
from uniperceiver_cli.checkpoints.safe_load import STATE_GLOBALS, torch_load
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.parallel.context import Context, on_any_process
from uniperceiver_cli.random_state import global_rng_state, set_global_rng_state
from uniperceiver_cli.train.engines.protocol import Engine

err_console = Console(stderr=True)  # the run's warnings and progress



class RunDirBusy(ValueError):
    """Another live process is training into the same run directory, or it cannot be made."""


class TrainingStopped(ValueError):
    """The run produced a non-finite loss, gradient or weight; the message is one line naming the step."""


class CheckpointWriteError(OSError):
    """A checkpoint or bundle could not be written; the message is one line naming the folder and the OS error."""


@contextlib.contextmanager
def run_lock(run_dir: Path, ctx: Context) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``run_dir/.lock`` while the run lasts (main process; the others learn the
    outcome by a broadcast). The kernel drops the lock when its process dies, so a killed run leaves nothing that
    blocks ``--resume auto``; the file only records the holder's pid for the message."""
    fd, error = None, ""
    if ctx.main:
        try:
            fd, error = _lock(run_dir)
        except OSError as e:  # the folder or the lock file cannot be made: every process must hear it
            error = f"cannot use {run_dir} as a run directory: {e.strerror or e}"
    if on_any_process(bool(error), ctx):  # only the main process looks
        raise RunDirBusy(error or f"{run_dir}: the main process cannot take it as its run directory")
    try:
        yield
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def check_shared(run_dir: Path, ctx: Context) -> None:
    """Refuse a run whose processes do not share ``run_dir`` (nodes each with a folder of their own): the main
    process writes a token there and every process must read it back. Unshared, each node would hold only its
    own processes' checkpoint parts, and a resume would wait forever for the missing ones."""
    if ctx.world_size == 1:
        return
    token = torch.tensor([secrets.randbits(62)], dtype=torch.int64, device=ctx.device)
    if ctx.main:
        (run_dir / SHARED_FILE).write_text(f"{int(token)}\n")
    torch.distributed.broadcast(token, src=0)  # after the main process wrote it
    try:
        seen = (run_dir / SHARED_FILE).read_text().strip()
    except OSError:
        seen = ""
    if on_any_process(seen != str(int(token)), ctx):
        raise ValueError(f"{run_dir} is not shared by every process of the run (another node sees another folder "
                         "there); give a run directory on a file system that every node mounts")


def check_complete(checkpoint: Path | None, ctx: Context) -> None:
    """Before any process loads: every process found the same kind of start (a checkpoint, or none), and in the
    checkpoint its own random state and no process's beyond the world size (a missing part would leave the others
    waiting in a collective; an extra one means it was written by more processes). Older checkpoints have none."""
    found = checkpoint is not None
    if on_any_process(found, ctx) and on_any_process(not found, ctx):
        raise FileNotFoundError("some processes found a checkpoint to resume from and others none: give every node "
                                "the same run directory and --resume path")
    if checkpoint is None:
        return
    folder = checkpoint / RNG_DIR
    missing = folder.is_dir() and not (folder / rng_file(ctx.rank)).is_file()
    more = (folder / rng_file(ctx.world_size)).is_file()
    if on_any_process(missing or more, ctx):
        detail = (f"{RNG_DIR}/{rng_file(ctx.rank)} of {ctx.world_size}" if missing else
                  f"{RNG_DIR}/{rng_file(ctx.world_size)} is there: written by more processes" if more else "another's")
        raise FileNotFoundError(f"{checkpoint} is incomplete: the part of a process is missing ({detail}); "
                                "resume from another checkpoint or with the processes that wrote it")


def _lock(run_dir: Path) -> tuple[int | None, str]:
    """The locked file descriptor, or the reason the folder is busy."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd, ""
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return None, (f"{run_dir} is in use by another run (process {holder}); wait for it to end "
                      "or pass another --run-dir")
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        # A file system without locks (Lustre mounted without -o flock): warn and go on unguarded.
        err_console.print(f"[yellow]warning:[/yellow] cannot lock {escape(str(run_dir))} ({e.strerror}); "
                          "nothing stops a second run into it", highlight=False, soft_wrap=True)
        return None, ""


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s random numbers (drop path, gate noise, masking, augmentation): the recipe's
    ``seed`` on rank 0, so one process draws as it always did, and an independent stream on every other rank."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # the CUDA generators too
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _process_state(generator: torch.Generator, device: torch.device, data: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint keeps of this process (``rng/rank-R.pt``): its global RNGs, CUDA's for ``device`` when the
    run is on CUDA, the loop's ``generator`` and its tasks' ``data`` positions."""
    state = {**global_rng_state(), "generator": generator.get_state(), "data": data}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def process_state(checkpoint: Path, client: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """What ``checkpoint`` kept of this process. Checkpoints of older versions hold rank 0's random state only, in
    the loop's ``client`` state (every process takes that one, as it did then), and no data positions."""
    path = checkpoint / RNG_DIR / rng_file(ctx.rank)
    if path.is_file():
        state = torch_load(path, "cannot resume from", STATE_GLOBALS)
        if not isinstance(state, dict):
            raise CheckpointError(f"cannot resume from {path}: not a random state")
        return {**state, "path": path}
    if "rng" in client:
        return {**client["rng"], "generator": client["generator"], "path": checkpoint}
    raise FileNotFoundError(f"{path} is missing: {checkpoint} was written by fewer processes; resume with the "
                            "number of processes that wrote it")


def restore_rng(state: dict[str, Any], ctx: Context, generator: torch.Generator) -> None:
    """Give this process the random state :func:`process_state` read."""
    try:
        set_global_rng_state(state)
        generator.set_state(state["generator"])
        if "cuda" in state and ctx.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], ctx.device)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot resume from {state['path']}: not a random state "
                              f"({' '.join(str(e).split())[:200]})") from None


def find_resume(run_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        found = [p for p in step_folders(run_dir) if (p / STATE_FILE).exists() or (p / DEEPSPEED_DIR).exists()]
        return found[-1] if found else None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    return path


def took_a_step(run_dir: Path) -> bool:
    """Whether a run in ``run_dir`` logged a step or wrote a checkpoint or its final bundle; one that failed
    before (a recipe error at its start) leaves nothing a new run must not overwrite."""
    metrics = run_dir / METRICS_FILE
    return (metrics.is_file() and metrics.stat().st_size > 0) or bool(step_folders(run_dir)) \
        or (run_dir / FINAL_DIR).exists()


def last_good(run_dir: Path) -> str:
    found = step_folders(run_dir)
    if not found:
        return "No checkpoint was written; nothing to resume."
    return f"The last good checkpoint is {found[-1]} (lower train.lr and pass --resume auto to continue from it)."


def check_weights(model: torch.nn.Module, step: int, run_dir: Path) -> None:
    """Stop on a non-finite weight. Under expert parallelism the processes hold different experts, so they agree
    first: every process stops, none waits for the others at the next collective."""
    names, params = zip(*model.named_parameters(), strict=True)
    finite = torch.stack([torch.isfinite(p).all() for p in params])
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        finite = finite.to(torch.int32)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    bad = [name for name, ok in zip(names, finite.tolist(), strict=True) if not ok]  # one host sync
    if bad:
        raise TrainingStopped(f"step {step}: {len(bad)} weight tensor(s) are not finite ({', '.join(bad[:3])}); "
                              f"training stopped. {last_good(run_dir)}")


def save_checkpoint(engine: Engine, ctx: Context, run_dir: Path, step: int, consumed: int,
                    generator: torch.Generator, keep: int, data: dict[str, Any]) -> None:
    """Write ``checkpoints/step-N`` (weights checked finite first) under a temporary name and rename it; keep the
    last ``keep``. The loop's state (``step``, the micro-batches ``consumed``) travels in it, and each process's
    random state and its tasks' ``data`` positions in ``rng/rank-R.pt``. A write that fails on any process (a full
    disk, a file-size limit) removes the partial folder and stops every process in one line; the checkpoints
    already written stay."""
    check_weights(engine.model, step, run_dir)
    target = step_folder(run_dir, step)
    tmp = writing_folder(target)
    client = {"step": step, "consumed": consumed}

    def prepare() -> None:
        if ctx.main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / RNG_DIR).mkdir(parents=True)

    def write_state() -> None:
        engine.save(tmp, client)
        with open(tmp / RNG_DIR / rng_file(ctx.rank), "wb") as file:
            torch.save(_process_state(generator, ctx.device, data), file)

    for write in (prepare, write_state):  # every process agrees after each (and waits)
        failure = ""
        try:
            with _writing(target):
                write()
        except CheckpointWriteError as e:
            failure = str(e)
        if on_any_process(bool(failure), ctx):
            if ctx.main:
                shutil.rmtree(tmp, ignore_errors=True)
            failure = failure or f"another process could not write its part of {target}"
            raise CheckpointWriteError(f"{failure}; training stopped. {last_good(run_dir)}")
    engine.barrier()
    if ctx.main:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        for old in step_folders(run_dir)[:-keep]:  # keep >= 1 (checked)
            shutil.rmtree(old)
    engine.barrier()


def save_final(model: UniPerceiver, final: Path, run_dir: Path) -> None:
    """Write the final bundle into ``final`` (main process). A failed write leaves no partial file and names the
    last good checkpoint."""
    try:
        with _writing(final):
            save_bundle(model, final)
    except CheckpointWriteError as e:
        for partial in final.glob("*.tmp"):
            partial.unlink(missing_ok=True)
        raise CheckpointWriteError(f"{e}; {last_good(run_dir)}") from None


@contextlib.contextmanager
def _writing(folder: Path) -> Iterator[None]:
    """Turn a failed write into :class:`CheckpointWriteError`: torch's and safetensors' writers raise their own
    errors (``RuntimeError: unexpected pos``, ``SafetensorError``), with the OSError, where they keep it, as the
    context."""
    try:
        yield
    except Exception as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, OSError) and cause.strerror:
            reason = f"[Errno {cause.errno}] {cause.strerror}"
        elif type(e).__name__ == "SafetensorError" or "unexpected pos" in str(e):  # their I/O errors, without one
            reason = " ".join(str(e).split())[:200]
        else:  # not a failed write: a bug must show as itself
            raise
        raise CheckpointWriteError(f"cannot write {folder}: {reason}") from None
