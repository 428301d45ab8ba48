"""Where a process runs (its rank, the world size, its device) and how it was launched: :func:`init_distributed` reads
what ``deepspeed``, ``torchrun`` or SLURM ``srun`` set (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT``, or ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``/``SLURM_JOB_NODELIST``), starts
``torch.distributed`` through DeepSpeed (nccl on GPUs, gloo on CPUs) and returns this process's :class:`Context`.
Started without any launcher it runs as a world of one."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

DEFAULT_PORT = 29500
DEFAULT_TIMEOUT = timedelta(minutes=30)  # engine.timeout_minutes' default


@dataclass
class Context:
    """Where this process sits: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[07-09,12],gpu3`` -> ``node07``), without ``scontrol``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None or not match.group(1):
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _scontrol_first_host(nodelist: str) -> str | None:
    if shutil.which("scontrol") is None:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``torch.distributed`` variables that this process still lacks, from whichever launcher started it.

    - ``deepspeed`` and ``torchrun`` set ``RANK`` and ``WORLD_SIZE`` (and the rest): nothing to add.
    - SLURM ``srun``: rank, world size and local rank from ``SLURM_PROCID``, ``SLURM_NTASKS`` and
      ``SLURM_LOCALID``; ``MASTER_ADDR`` (unless set) is the first host of ``SLURM_JOB_NODELIST``, by
      ``scontrol show hostnames`` when it is there; ``MASTER_PORT`` (unless set) is derived from the job id, so
      two jobs sharing a node do not collide.
    - No launcher: a world of one on this machine, on a free port.
    """
    env: dict[str, str] = {}
    if "RANK" in environ and "WORLD_SIZE" in environ:
        env["LOCAL_RANK"] = environ.get("LOCAL_RANK", "0")
        env["MASTER_ADDR"] = environ.get("MASTER_ADDR", "127.0.0.1")
        env["MASTER_PORT"] = environ.get("MASTER_PORT", str(DEFAULT_PORT))
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        env["RANK"], env["WORLD_SIZE"] = environ["SLURM_PROCID"], environ["SLURM_NTASKS"]
        env["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" in environ:
            env["MASTER_ADDR"] = environ["MASTER_ADDR"]
        else:
            nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
            if not nodelist:
                raise RuntimeError("under SLURM without SLURM_JOB_NODELIST: set MASTER_ADDR to the first node's name")
            env["MASTER_ADDR"] = _scontrol_first_host(nodelist) or first_host(nodelist)
        job = environ.get("SLURM_JOB_ID", "")
        port = str(DEFAULT_PORT + int(job) % 10000) if job.isdigit() else str(DEFAULT_PORT)
        env["MASTER_PORT"] = environ.get("MASTER_PORT", port)
    else:
        env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": environ.get("MASTER_PORT", str(_free_port()))}
    return {key: value for key, value in env.items() if environ.get(key) != value}


def init_distributed(device: torch.device, timeout: timedelta = DEFAULT_TIMEOUT) -> Context:
    """Start ``torch.distributed`` through DeepSpeed for whichever launcher started this process.

    Args:
        device: the device asked for (``--device``): CUDA if its type is ``cuda`` and CUDA is available, else
            CPU. On CUDA each process takes ``cuda:LOCAL_RANK`` (modulo the GPUs it sees) and the backend is
            nccl; on CPU it is gloo.
        timeout: how long a collective waits for the other processes (``engine.timeout_minutes``).

    Returns:
        This process's rank, the world size and its device.
    """
    os.environ.update(launcher_env(os.environ))
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: it picks its accelerator then
    import deepspeed

    if not cuda:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op when it starts (about 50 s on a
        # first run). Only DeepSpeed-inference's tensor-parallel all-reduce uses it; training's collectives
        # are gloo's. Marking the op incompatible skips the build (DeepSpeed caches this table in its module
        # "so edits to it persist").
        compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
        if isinstance(compatible, dict):
            compatible["deepspeed_shm_comm"] = False
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        # All of the node's GPUs visible (deepspeed, torchrun, srun --gpus-per-node): cuda:LOCAL_RANK. One GPU
        # per task (srun --gpus-per-task=1): cuda:0.
        local_rank %= torch.cuda.device_count()
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                               distributed_port=int(os.environ["MASTER_PORT"]), verbose=False, timeout=timeout)
    # DeepSpeed makes its own groups (a clone of the world group for data parallelism, the expert groups) with
    # torch's default timeout, which new_group reads from these two at each call: make it the run's.
    c10d = torch.distributed.distributed_c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return Context(rank=rank, world_size=world, device=torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


def on_any_process(flag: bool | torch.Tensor, ctx: Context) -> bool:
    """Whether ``flag`` (a bool, or a device tensor read here) holds on any process: one all-reduce when there are
    several, and one host sync."""
    if ctx.world_size == 1:
        return bool(flag)
    value = torch.as_tensor(flag, dtype=torch.float32, device=ctx.device).reshape(1)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def waiting_group(ctx: Context, timeout: timedelta) -> Any:
    """A gloo group of every process for waiting on the main process (its evaluation during training) under
    ``timeout``: waiting in a collective of the run's own group would fail after ``engine.timeout_minutes``.
    Every process calls it; None for a world of one."""
    if ctx.world_size == 1:
        return None
    return torch.distributed.new_group(backend="gloo", timeout=timeout)
