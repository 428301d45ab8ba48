"""``engine: deepspeed``: the one training loop under ``deepspeed.initialize`` (data parallel, ZeRO 0/1/2, fp16;
bf16 is the loop's autocast over fp32 weights).

:class:`DeepSpeedEngine` offers what :class:`~uniperceiver_cli.train.engines.single.SingleEngine` offers. The
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
  process at the same global batch). ZeRO 3 (partitioned weights, gathered around each submodule's forward)
  would not fit these direct calls; recipes cannot ask for it.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from uniperceiver_cli.checkpoints.errors import CheckpointError
from uniperceiver_cli.checkpoints.runs import CLIENT_KEY, DEEPSPEED_DIR, DEEPSPEED_TAG, EXPERTS_DIR, expert_shard_file
from uniperceiver_cli.checkpoints.safe_load import STATE_GLOBALS, deepspeed_records, torch_load
from uniperceiver_cli.model.moe import ExpertLinear
from uniperceiver_cli.parallel import experts
from uniperceiver_cli.parallel.context import Context
from uniperceiver_cli.text_files import read_json
from uniperceiver_cli.train.engines.protocol import FP16_GROWTH_INTERVAL, FP16_INITIAL_SCALE_POWER
from uniperceiver_cli.train.optim import build_optimizer, build_scheduler, param_groups
from uniperceiver_cli.train.recipe import Recipe

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
    # bf16 is the loop's autocast: DeepSpeed's bf16 mode would keep the weights (LayerNorms, LayerScale, logit
    # scales) in bf16 and accumulate and reduce the gradients in bf16. Off, the weights, gradients, their
    # all-reduce and the optimizer state stay fp32, as under the reference's autocast.
    config["bf16"] = {**config.get("bf16", {}), "enabled": False}
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
def _expert_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The optimizer's groups with the experts in groups of their own, as DeepSpeed's ZeRO requires."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{**group, "name": name} for name, group in zip(("decay", "no_decay"), param_groups(model, weight_decay),
                                                                strict=True)]
    return [group for group in split_params_into_different_moe_groups_for_optimizer(named) if group["params"]]


class DeepSpeedEngine:
    """The loop's engine under ``deepspeed.initialize``; same interface as ``SingleEngine``.

    Attributes:
        model: the trained module itself (``engine.module``), whose methods the loop calls.
        engine: the ``deepspeed.DeepSpeedEngine``.
    """

    def __init__(self, model: torch.nn.Module, recipe: Recipe, ctx: Context, run_dir: Path) -> None:
        import deepspeed

        self.shard: experts.ExpertShard | None = None
        self.expert_parallel = recipe.engine.expert_parallel
        self.config = deepspeed_config(recipe, ctx.world_size, run_dir)
        groups = None
        if self.expert_parallel > 1:
            if recipe.engine.zero_stage == 0 and recipe.train.precision == "fp16":
                raise ValueError("engine.expert_parallel with fp16 needs engine.zero_stage 1 or 2 (DeepSpeed's fp16 "
                                 "optimizer at ZeRO 0 is not checked with sharded experts)")
            if self.config["zero_optimization"].get("load_from_fp32_weights") is False:
                raise ValueError("engine.expert_parallel needs zero_optimization.load_from_fp32_weights (the "
                                 "default): on resume each process's experts come from its own fp32 state")
            self.shard = experts.expert_group(model, self.expert_parallel, ctx)
            experts.register_experts(model, self.shard, self.expert_parallel)  # on the host: no device holds them all
            groups = _expert_param_groups(model, recipe.train.weight_decay)
        model = model.to(ctx.device)
        optimizer = build_optimizer(model, recipe.train, groups)
        scheduler = build_scheduler(optimizer, recipe.train)
        # Plain data parallel (ZeRO 0, no fp16 optimizer) clips with DeepSpeed's clip_grad_norm_,
        # which fails on 0-dim gradients (the logit scales: "output with shape [] doesn't match the broadcast
        # shape [1]"). There the gradients are already averaged when the boundary micro-step's backward
        # returns, so this engine clips them itself, with torch's clip_grad_norm_ as the single engine does,
        # right before DeepSpeed's optimizer step. ZeRO 1/2 and fp16 clip inside DeepSpeed's optimizers.
        plain = self.config["zero_optimization"]["stage"] == 0 and not self.config["fp16"]["enabled"]
        self.clip = self.config["gradient_clipping"] if plain else 0.0
        if plain:
            self.config["gradient_clipping"] = 0.0
        self.norm: torch.Tensor | None = None
        with _scalars_broadcast_here(model):
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                        config=self.config)
        # With fp16 and ZeRO 0 DeepSpeed wraps the optimizer in FP16_(Unfused)Optimizer, which creates the
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
                self.norm = experts.clip_with_experts(params, self.clip, self.shard)
        self.engine.step()

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
        if self.shard is not None and experts.writes_experts(self.expert_parallel):
            from safetensors.torch import save_file

            folder = Path(directory) / EXPERTS_DIR
            folder.mkdir(exist_ok=True)
            save_file(experts.local_experts(self.model),
                      folder / expert_shard_file(self.shard.rank, self.expert_parallel),
                      metadata={"first": str(self.shard.first), "count": str(self.shard.count),
                                "num_experts": str(self.shard.count * self.expert_parallel)})

    def load(self, directory: Path) -> dict[str, Any]:
        """Restore what :meth:`save` wrote; returns the loop's state. Every process calls it."""
        folder = Path(directory) / DEEPSPEED_DIR
        self._check_expert_layout(Path(directory) / EXPERTS_DIR)  # before DeepSpeed fails on the shapes
        try:
            path, state = self.engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG)
        except CheckpointError:  # a file refused by safe_load
            raise
        except (KeyError, RuntimeError, ValueError) as e:  # e.g. an earlier version's bf16 mode (bf16 weights)
            raise CheckpointError(f"cannot resume from {folder}: it does not fit this run's engine (ZeRO stage, "
                                  f"precision, model) ({' '.join(str(e).split())[:200]}); checkpoints of DeepSpeed's "
                                  "bf16 mode (before bf16 became autocast) resume only as init= weights") from None
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
        local = experts.local_experts(self.model)
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
        full = experts.gather_experts(self.model)
        if torch.distributed.get_rank() != 0:
            return None
        from uniperceiver_cli.model.uniperceiver import UniPerceiver

        model = UniPerceiver(self.model.config)  # on the host, filled, then moved: one full copy on the device
        model.load_state_dict({**{k: v.cpu() for k, v in self.model.state_dict().items()}, **full})
        model = model.to(self.model.device)
        model.targets = self.model.targets
        return model
