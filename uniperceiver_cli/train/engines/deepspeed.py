"""``engine: deepspeed``: the one training loop under ``deepspeed.initialize`` (data parallel, ZeRO 0/1/2, bf16/fp16).

Launchers. :func:`init_distributed` reads the environment that ``deepspeed``, ``torchrun`` and SLURM ``srun``
leave behind (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``, or ``SLURM_PROCID``/
``SLURM_NTASKS``/``SLURM_LOCALID``/``SLURM_JOB_NODELIST``), starts ``torch.distributed`` through DeepSpeed
(nccl on GPUs, gloo on CPUs) and returns this process's :class:`~uniperceiver_cli.parallel.context.Context`.
Started without any launcher it runs as a world of one.

Engine. :class:`DeepSpeedEngine` offers what :class:`~uniperceiver_cli.train.loop.SingleEngine` offers. The
recipe builds the optimizer and schedule (:mod:`uniperceiver_cli.train.optim`) and DeepSpeed steps them. How the
loop's calls map onto DeepSpeed:

- ``backward(loss)`` is ``engine.backward(loss)``. DeepSpeed divides the loss by the accumulation steps itself,
  which is exactly the ``loss / accumulation`` of the single engine, and averages the gradients over the
  processes; with the same samples per step the update equals single-process training at the global batch.
- ``micro_step()`` is ``engine.step()``: DeepSpeed counts micro-batches and, at the accumulation boundary, clips
  (``gradient_clipping``, the global norm), steps the optimizer and the schedule and zeroes the gradients.
  ``step()`` has nothing left to do.
- The loop calls model methods (``encode_text``, ``classification_logits``, ...) on ``.model`` instead of a
  ``forward``. For ZeRO 0/1/2 that is enough: the gradient reduction is driven by ``engine.backward`` (ZeRO 0:
  an all-reduce at the boundary; ZeRO 1/2: the optimizer's gradient hooks and the backward epilogue), not by
  ``engine.forward``. Checked numerically (``tests/train/test_deepspeed.py``: two gloo processes equal one
  process at the same global batch) and, for bf16 with ZeRO 0/1 and accumulation, against the same training
  routed through ``engine.forward`` (identical weights). ZeRO 3 (partitioned weights, gathered around each
  submodule's forward) would not fit these direct calls; recipes cannot ask for it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from uniperceiver_cli.checkpoints import STATE_GLOBALS, deepspeed_records, torch_load
from uniperceiver_cli.checkpoints.runs import CLIENT_KEY, DEEPSPEED_DIR, DEEPSPEED_TAG, EXPERTS_DIR, expert_shard_file
from uniperceiver_cli.model.moe import ExpertLinear, ExpertShard, gather_experts, shard_experts
from uniperceiver_cli.parallel.context import Context
from uniperceiver_cli.text_files import read_json
from uniperceiver_cli.train.engines.protocol import FP16_GROWTH_INTERVAL, FP16_INITIAL_SCALE_POWER
from uniperceiver_cli.train.optim import build_optimizer, build_scheduler, param_groups
from uniperceiver_cli.train.recipe import Recipe

DEFAULT_PORT = 29500


# ------------------------------------------------------------------------------------------------- launchers


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


def init_distributed(device: torch.device) -> Context:
    """Start ``torch.distributed`` through DeepSpeed for whichever launcher started this process.

    Args:
        device: the device asked for (``--device``): CUDA if its type is ``cuda`` and CUDA is available, else
            CPU. On CUDA each process takes ``cuda:LOCAL_RANK`` (modulo the GPUs it sees) and the backend is
            nccl; on CPU it is gloo.

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
                               distributed_port=int(os.environ["MASTER_PORT"]), verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return Context(rank=rank, world_size=world, device=torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


# ------------------------------------------------------------------------------------------------- config


def deepspeed_config(recipe: Recipe, world_size: int, run_dir: Path | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a run: the recipe's JSON (``engine.deepspeed_config``, optional) with the keys
    the recipe owns filled in from the recipe, and every path it names moved under ``run_dir/deepspeed``
    (:func:`confine_paths`).

    The recipe owns the batch keys, accumulation, clipping, the ZeRO stage and precision. Any other key of the
    JSON (ZeRO bucket sizes, overlap_comm, offload, fp16 scaling details, logging) is kept. The optimizer and
    schedule come from the recipe's ``train`` section, so a JSON that names its own is refused.

    Raises:
        FileNotFoundError: if the JSON does not exist.
        ValueError: if it is not a JSON object, has ``optimizer``/``scheduler`` sections, turns on a monitor that
            reports to a server (wandb, comet) or names a path outside the run directory.
    """
    config: dict[str, Any] = {}
    path = recipe.engine.deepspeed_config
    if path:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"engine.deepspeed_config: {path} does not exist")
        config = read_json(file, "engine.deepspeed_config:", limit=1 << 20)
        if not isinstance(config, dict):
            raise ValueError(f"engine.deepspeed_config: {path} is not a JSON object")
        clash = [key for key in ("optimizer", "scheduler") if key in config]
        if clash:
            raise ValueError(f"engine.deepspeed_config: {path} sets {' and '.join(clash)}; the recipe's train "
                             "section sets the optimizer and schedule, remove them from the JSON")
        if isinstance(config.get("checkpoint"), dict) and config["checkpoint"].get("load_universal"):
            raise ValueError(f"engine.deepspeed_config: {path} sets checkpoint.load_universal, whose loader "
                             "unpickles files with weights_only=False (a planted file could run code); remove it")
    config = confine_paths(copy.deepcopy(config), path or "the DeepSpeed config", run_dir)
    spec = recipe.train
    # The loop feeds its own batches (one task's batch per micro-step, each task with its own batch_size per
    # process) and never hands DeepSpeed a data loader, so DeepSpeed's batch size is nominal: 1 "sample" per
    # micro-step. It only sizes DeepSpeed's throughput counters; what DeepSpeed uses is the accumulation.
    config.pop("train_batch_size", None)
    config["train_micro_batch_size_per_gpu"] = 1
    config["gradient_accumulation_steps"] = spec.accumulation
    config["train_batch_size"] = spec.accumulation * world_size
    config["gradient_clipping"] = max(0.0, float(spec.grad_clip))  # 0 turns clipping off, as in the single engine
    config["zero_optimization"] = {**config.get("zero_optimization", {}), "stage": recipe.engine.zero_stage}
    config.setdefault("zero_allow_untested_optimizer", True)  # the recipe's torch AdamW under ZeRO
    fp16 = {"initial_scale_power": FP16_INITIAL_SCALE_POWER, "loss_scale_window": FP16_GROWTH_INTERVAL,
            **config.get("fp16", {})}
    config["fp16"] = {**fp16, "enabled": spec.precision == "fp16"}
    config["bf16"] = {**config.get("bf16", {}), "enabled": spec.precision == "bf16"}
    config.pop("amp", None)
    config.setdefault("steps_per_print", 2**31 - 1)  # the loop logs; keep DeepSpeed's own step lines quiet
    return config


PATH_KEY = re.compile(r"(path|file|dir|folder)s?$|^job_name$")  # keys whose values DeepSpeed opens as a path
OUTPUT_DIR = "deepspeed"  # RUN_DIR/deepspeed: what DeepSpeed itself writes (monitors, profiler, NVMe offload)
SERVER_MONITORS = ("wandb", "comet")


def confine_paths(config: dict[str, Any], source: str, run_dir: Path | None) -> dict[str, Any]:
    """``config`` with every path it names (a key ending in path, file, dir or folder: monitors' output_path, the
    flops profiler's output_file, an NVMe offload path, ...) moved under ``run_dir/deepspeed``,
    so a handed JSON cannot make a run read or write elsewhere. Such a value must be relative, without ``..``.
    DeepSpeed's wandb and comet monitors send the run to a server and are refused. Without ``run_dir`` the
    paths are only checked."""
    for monitor in SERVER_MONITORS:
        if isinstance(config.get(monitor), dict) and config[monitor].get("enabled"):
            raise ValueError(f"engine.deepspeed_config: {source} enables DeepSpeed's {monitor} monitor, which sends "
                             "the run to a server; remove it (the run's TensorBoard events are in the run directory)")
    for section in ("tensorboard", "csv_monitor"):  # enabled without output_path, they write under ~ (home)
        if isinstance(config.get(section), dict) and config[section].get("enabled"):
            config[section].setdefault("output_path", "")
    return _confined(config, source, run_dir, "")


def _confined(value: Any, source: str, run_dir: Path | None, key: str) -> Any:
    if isinstance(value, dict):
        return {k: _confined(v, source, run_dir, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_confined(v, source, run_dir, key) for v in value]
    if not isinstance(value, str) or not PATH_KEY.search(key.rsplit(".", 1)[-1].lower()):
        return value
    path = Path(value)
    if path.is_absolute() or ".." in path.parts or value.startswith("~"):
        raise ValueError(f"engine.deepspeed_config: {source} sets {key} to {value[:80]!r}, outside the run "
                         "directory; give a path relative to it (it is placed under RUN_DIR/deepspeed)")
    if run_dir is None or key.endswith("job_name"):  # a job name is a folder inside its output_path
        return value
    return str(run_dir / OUTPUT_DIR / path)


# ------------------------------------------------------------------------------------------------- engine


def safe_load(path: str, map_location: Any = None) -> Any:
    """One file of a DeepSpeed checkpoint, loaded with ``weights_only=True``: tensors, plain containers, numpy's
    plain arrays (older client states) and the few DeepSpeed classes its ZeRO optimizer states hold (plain
    records: a loss scaler, a ZeRO stage enum, a fragment address). Anything else is refused without running."""
    return torch_load(path, "cannot resume from", (*STATE_GLOBALS, *deepspeed_records()), map_location)


@contextlib.contextmanager
def _scalars_broadcast_here(model: torch.nn.Module) -> Iterator[None]:
    """Broadcast the model's 0-dim parameters (the logit scales) from rank 0 here, and hide them from
    DeepSpeed's own start-up broadcast while ``deepspeed.initialize`` runs.

    Why: DeepSpeed 0.19 broadcasts every parameter as ``p.data.view(torch.uint8)``, which PyTorch refuses for
    a 0-dim tensor ("self.dim() cannot be 0 to view Float as Byte"). Its broadcast skips parameters marked
    ``ds_optim_param`` (a mark read only at start-up, by that broadcast and by the LoRA-offload set-up, which
    needs LoRA layers); the mark is removed as soon as ``initialize`` returns.
    """
    scalars = [p for p in model.parameters() if p.dim() == 0]
    dist = torch.distributed
    if scalars and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in scalars:
            dist.broadcast(p.data, src=0)
    for p in scalars:
        p.ds_optim_param = True
    try:
        yield
    finally:
        for p in scalars:
            del p.ds_optim_param


# ------------------------------------------------------------------------------------------------- experts
def _expert_group(model: torch.nn.Module, size: int, ctx: Context) -> ExpertShard:
    """DeepSpeed's expert-parallel groups for ``size``, and this process's share of the experts."""
    from deepspeed.utils import groups

    moe = getattr(model.config, "moe", None)
    if moe is None:
        raise ValueError(f"engine.expert_parallel {size} needs an MoE model; the recipe's model has no experts")
    if moe.num_experts % size or ctx.world_size % size:
        raise ValueError(f"engine.expert_parallel {size} must divide the model's {moe.num_experts} experts and the "
                         f"{ctx.world_size} processes")
    name = f"ep_size_{size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(size)
    group = groups._get_expert_parallel_group(name)
    count = moe.num_experts // size
    first = groups._get_expert_parallel_rank(name) * count
    return ExpertShard(first, count, group, torch.distributed.get_global_rank(group, 0), moe.num_experts)


def _register_experts(model: torch.nn.Module, shard: ExpertShard, size: int) -> None:
    """Shard the experts and make DeepSpeed treat them as its own expert parameters.

    DeepSpeed recognises expert parameters by ``allreduce = False`` and ``group_name``: it broadcasts them at
    start-up within the expert-data-parallel group only, reduces their gradients over that group, and ZeRO
    partitions their optimizer state over it. Its engine and ZeRO switch that on only for a model holding one of
    its ``MoE`` modules, so the model gets an empty one that registers the group. It holds no experts: our
    experts are the model's ``ExpertLinear`` slices, which :meth:`DeepSpeedEngine.save` writes itself (DeepSpeed
    writes per-expert files only for its own expert modules and the module states only from rank 0).
    """
    from deepspeed.moe.layer import MoE

    class ExpertRegistration(MoE):
        def __init__(self) -> None:
            torch.nn.Module.__init__(self)
            self.num_experts, self.ep_size = model.config.moe.num_experts, size
            self.expert_group_name = f"ep_size_{size}"
            self.num_local_experts = 0  # no per-expert files of DeepSpeed's: see DeepSpeedEngine.save

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups exist already (_expert_group)

        def forward(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("the expert registration is not a layer")

    shard_experts(model, shard)
    for module in model.modules():
        if isinstance(module, ExpertLinear):
            for param in module.parameters():
                param.allreduce = False
                param.group_name = f"ep_size_{size}"
    model.add_module("deepspeed_experts", ExpertRegistration())


def _expert_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The optimizer's groups with the experts in groups of their own, as DeepSpeed's ZeRO requires."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{**group, "name": name} for name, group in zip(("decay", "no_decay"), param_groups(model, weight_decay),
                                                                strict=True)]
    return [group for group in split_params_into_different_moe_groups_for_optimizer(named) if group["params"]]


def _local_experts(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": getattr(module, key).detach().cpu().contiguous()
            for name, module in model.named_modules() if isinstance(module, ExpertLinear)
            for key in ("weight", "bias")}


class DeepSpeedEngine:
    """The loop's engine under ``deepspeed.initialize``; same interface as ``SingleEngine``.

    Attributes:
        model: the trained module itself (``engine.module``), whose methods the loop calls.
        engine: the ``deepspeed.DeepSpeedEngine``.
    """

    def __init__(self, model: torch.nn.Module, recipe: Recipe, ctx: Context, run_dir: Path) -> None:
        import deepspeed

        self.shard: ExpertShard | None = None
        self.expert_parallel = recipe.engine.expert_parallel
        self.config = deepspeed_config(recipe, ctx.world_size, run_dir)
        groups = None
        if self.expert_parallel > 1:
            if recipe.engine.zero_stage == 0 and recipe.train.precision != "fp32":
                raise ValueError(f"engine.expert_parallel with {recipe.train.precision} needs engine.zero_stage 1 or "
                                 f"2 (DeepSpeed's {recipe.train.precision} optimizer at ZeRO 0 is not checked with "
                                 f"sharded experts)")
            if self.config["zero_optimization"].get("load_from_fp32_weights") is False:
                raise ValueError("engine.expert_parallel needs zero_optimization.load_from_fp32_weights (the "
                                 "default): on resume each process's experts come from its own fp32 state")
            self.shard = _expert_group(model, self.expert_parallel, ctx)
            _register_experts(model, self.shard, self.expert_parallel)  # before the move: no device holds every expert
            groups = _expert_param_groups(model, recipe.train.weight_decay)
        model = model.to(ctx.device)
        optimizer = build_optimizer(model, recipe.train, groups)
        scheduler = build_scheduler(optimizer, recipe.train)
        # Plain fp32 data parallel (ZeRO 0, no fp16/bf16 optimizer) clips with DeepSpeed's clip_grad_norm_,
        # which fails on 0-dim gradients (the logit scales: "output with shape [] doesn't match the broadcast
        # shape [1]"). There the gradients are already averaged when the boundary micro-step's backward
        # returns, so this engine clips them itself, with torch's clip_grad_norm_ as the single engine does,
        # right before DeepSpeed's optimizer step. ZeRO 1/2 and bf16/fp16 clip inside DeepSpeed's optimizers.
        plain = (self.config["zero_optimization"]["stage"] == 0 and not self.config["fp16"]["enabled"]
                 and not self.config["bf16"]["enabled"])
        self.clip = self.config["gradient_clipping"] if plain else 0.0
        if plain:
            self.config["gradient_clipping"] = 0.0
        self.norm: torch.Tensor | None = None
        with _scalars_broadcast_here(model):
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                        config=self.config)
        # With bf16/fp16 and ZeRO 0 DeepSpeed wraps the optimizer in FP16_(Unfused)Optimizer, which creates the
        # optimizer state by one step on zero gradients. Adam would count that step: its bias correction would
        # take the first real step for the second and shrink it (0.74x). No real step has happened: reset it.
        for state in optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"].zero_()
            elif "step" in state:
                state["step"] = 0
        self.model = self.engine.module
        # Every checkpoint file DeepSpeed reads goes through its checkpoint engine's load(); its own unpickles
        # with weights_only=False. Ours is the same call, but only tensors and plain data are accepted.
        self.engine.checkpoint_engine.load = safe_load

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss / accumulation``, averaged over the processes at the accumulation boundary."""
        self.engine.backward(loss)

    def micro_step(self) -> None:
        """Count the micro-batch; at the accumulation boundary clip, step the optimizer and the schedule."""
        if self.clip > 0 and self.engine.is_gradient_accumulation_boundary():
            params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
            if self.shard is None:
                self.norm = torch.nn.utils.clip_grad_norm_(params, self.clip)
            else:
                self.norm = self._clip_with_experts(params)
        self.engine.step()

    def _clip_with_experts(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """clip_grad_norm_ over the whole model when each process holds a share of the experts: the experts' part
        of the squared norm is summed over the expert-parallel group (the other parameters are alike everywhere)."""
        zero = torch.zeros((), device=params[0].device)
        expert = [p.grad.detach().float().pow(2).sum() for p in params if getattr(p, "allreduce", True) is False]
        dense = [p.grad.detach().float().pow(2).sum() for p in params if getattr(p, "allreduce", True)]
        experts = torch.stack(expert or [zero]).sum()
        torch.distributed.all_reduce(experts, group=self.shard.group)
        norm = (torch.stack(dense or [zero]).sum() + experts).sqrt()
        scale = (self.clip / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.detach().mul_(scale.to(p.grad.dtype))
        return norm

    def step(self) -> torch.Tensor | None:
        """DeepSpeed stepped in the last ``micro_step``; returns the global gradient norm when known."""
        norm = self.engine.get_global_grad_norm()
        return self.norm if norm is None else torch.as_tensor(norm)

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def barrier(self) -> None:
        torch.distributed.barrier()

    def save(self, directory: Path, client: dict[str, Any]) -> None:
        """DeepSpeed's checkpoint (module, optimizer partitions, schedule) in ``directory/deepspeed``; every
        process calls it. ``client`` (the loop's state) travels inside it."""
        self.engine.save_checkpoint(str(Path(directory) / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                    client_state={CLIENT_KEY: client})
        if self.shard is not None and self._writes_experts():
            from safetensors.torch import save_file

            folder = Path(directory) / EXPERTS_DIR
            folder.mkdir(exist_ok=True)
            save_file(_local_experts(self.model), folder / expert_shard_file(self.shard.rank, self.expert_parallel),
                      metadata={"first": str(self.shard.first), "count": str(self.shard.count),
                                "num_experts": str(self.shard.count * self.expert_parallel)})

    def _writes_experts(self) -> bool:
        """One process per expert shard writes it: the first of its expert-data-parallel group."""
        from deepspeed.utils import groups

        return groups._get_expert_data_parallel_rank(f"ep_size_{self.expert_parallel}") == 0

    def load(self, directory: Path) -> dict[str, Any]:
        """Restore what :meth:`save` wrote; returns the loop's state. Every process calls it."""
        folder = Path(directory) / DEEPSPEED_DIR
        self._check_expert_layout(Path(directory) / EXPERTS_DIR)  # before DeepSpeed fails on the shapes
        path, state = self.engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG)
        if path is None or not state or CLIENT_KEY not in state:
            raise FileNotFoundError(f"{folder} holds no DeepSpeed checkpoint of this run (tag {DEEPSPEED_TAG!r})")
        if self.shard is not None:
            self._load_experts(Path(directory) / EXPERTS_DIR)
        return state[CLIENT_KEY]

    def _check_expert_layout(self, folder: Path) -> None:
        """A checkpoint resumes only with the expert parallelism it was written with (its shards, or none)."""
        written = sorted(p.name for p in folder.glob("rank-*.safetensors")) if folder.is_dir() else []
        if self.shard is None:
            if written:
                raise ValueError(f"{folder} holds expert shards ({', '.join(written[:2])}, ...): the checkpoint was "
                                 f"written with engine.expert_parallel > 1; resume with the same setting")
            return
        path = folder / expert_shard_file(self.shard.rank, self.expert_parallel)
        if not path.is_file():
            held = ", ".join(written) or "no expert shards"
            raise FileNotFoundError(f"{path} is missing: the checkpoint holds {held}; resume with the "
                                    f"engine.expert_parallel it was written with")

    def _load_experts(self, folder: Path) -> None:
        """This process's experts from the checkpoint's shard (DeepSpeed restored rank 0's module states)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = folder / expert_shard_file(self.shard.rank, self.expert_parallel)
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {path}: {e}") from None
        local = _local_experts(self.model)
        if tensors.keys() != local.keys() or any(tensors[k].shape != local[k].shape for k in local):
            raise ValueError(f"{path} does not hold this model's experts {self.shard.first}.."
                             f"{self.shard.first + self.shard.count - 1}")
        with torch.no_grad():
            for name, module in self.model.named_modules():
                if isinstance(module, ExpertLinear):
                    module.weight.copy_(tensors[f"{name}.weight"])
                    module.bias.copy_(tensors[f"{name}.bias"])

    def inference_model(self) -> torch.nn.Module | None:
        """The whole model for evaluation and the final bundle. Under expert parallelism a collective: every
        process calls it; the main process gets a copy with every expert (the others None)."""
        if self.shard is None:
            return self.model
        full = gather_experts(self.model)
        if torch.distributed.get_rank() != 0:
            return None
        from uniperceiver_cli.model.uniperceiver import UniPerceiver

        model = UniPerceiver(self.model.config)  # on the host, filled, then moved: one full copy on the device
        model.load_state_dict({**{k: v.cpu() for k, v in self.model.state_dict().items()}, **full})
        model = model.to(next(self.model.parameters()).device)
        model.class_names, model.caption_vocabulary = self.model.class_names, self.model.caption_vocabulary
        return model
