"""Expert parallelism over torch.distributed and DeepSpeed: :class:`ExpertShard`, the model's
:class:`~uniperceiver_cli.model.moe.ExpertGroup`; the groups' set-up, DeepSpeed's expert marks, clipping, gathering."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from uniperceiver_cli.model.moe import ExpertLinear, shard_experts
from uniperceiver_cli.parallel.context import Context


@dataclass(frozen=True)
class ExpertShard:
    """This process holds experts [first, first + count) of the ``total`` of every MoE layer; the others are on the
    other processes of ``group`` (DeepSpeed's expert-parallel group), whose first process is global rank ``src``."""

    first: int
    count: int
    group: Any  # a torch.distributed ProcessGroup
    src: int
    total: int  # the experts of a layer, over the group

    @property
    def rank(self) -> int:
        """This process's place in the group: the index of its share of the experts."""
        return self.first // self.count

    def share(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.broadcast(tensor, src=self.src, group=self.group)
        return tensor

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(tensor, group=self.group)

    def exchange(self, buffer: torch.Tensor) -> torch.Tensor:
        from deepspeed.moe.sharded_moe import _AllToAll  # DeepSpeed's autograd-aware all-to-all

        return _AllToAll.apply(self.group, buffer)

    def largest(self, value: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return value

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every process's ``local`` (the same shape), concatenated in the group's order."""
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts)


def expert_group(model: torch.nn.Module, size: int, ctx: Context) -> ExpertShard:
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
    return ExpertShard(first, count, group, dist.get_global_rank(group, 0), moe.num_experts)


def register_experts(model: torch.nn.Module, shard: ExpertShard, size: int) -> None:
    """Shard the experts and make DeepSpeed treat them as its own expert parameters.

    DeepSpeed recognises expert parameters by ``allreduce = False`` and ``group_name``: it broadcasts them at
    start-up within the expert-data-parallel group only, reduces their gradients over that group, and ZeRO
    partitions their optimizer state over it. Its engine and ZeRO switch that on only for a model holding one of
    its ``MoE`` modules, so the model gets an empty one that registers the group. It holds no experts: our
    experts are the model's ``ExpertLinear`` slices, which ``DeepSpeedEngine.save`` writes itself (DeepSpeed
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
            pass  # the groups exist already (expert_group)

        def forward(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("the expert registration is not a layer")

    shard_experts(model, shard)
    for module in model.modules():
        if isinstance(module, ExpertLinear):
            for param in module.parameters():
                param.allreduce = False
                param.group_name = f"ep_size_{size}"
    model.add_module("deepspeed_experts", ExpertRegistration())


def writes_experts(size: int) -> bool:
    """One process per expert shard writes it: the first of its expert-data-parallel group."""
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_rank(f"ep_size_{size}") == 0


def clip_with_experts(params: list[torch.nn.Parameter], max_norm: float, shard: ExpertShard) -> torch.Tensor:
    """clip_grad_norm_ over the whole model when each process holds a share of the experts: the experts' part
    of the squared norm is summed over the expert-parallel group (the other parameters are alike everywhere)."""
    zero = torch.zeros((), device=params[0].device)
    expert = [p.grad.detach().float().pow(2).sum() for p in params if getattr(p, "allreduce", True) is False]
    dense = [p.grad.detach().float().pow(2).sum() for p in params if getattr(p, "allreduce", True)]
    experts = torch.stack(expert or [zero]).sum()
    dist.all_reduce(experts, group=shard.group)
    norm = (torch.stack(dense or [zero]).sum() + experts).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.detach().mul_(scale.to(p.grad.dtype))
    return norm


def local_experts(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The experts this process holds, on the host: ``{state-dict key: (count, ...)}``."""
    return {f"{name}.{key}": getattr(module, key).detach().cpu().contiguous()
            for name, module in model.named_modules() if isinstance(module, ExpertLinear)
            for key in ("weight", "bias")}


def gather_experts(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every expert of every sharded :class:`ExpertLinear`, stacked from the group's processes in expert order, on
    the host: ``{state-dict key: (E, ...)}``. A collective: every process of the group calls it; one layer's
    experts at a time are on the device."""
    return {f"{name}.{key}": module.group.gather(getattr(module, key).detach().contiguous()).cpu()
            for name, module in model.named_modules() if isinstance(module, ExpertLinear) and module.group is not None
            for key in ("weight", "bias")}
