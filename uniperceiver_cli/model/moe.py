"""Conditional (attribute-routed) mixture of experts, as in Uni-Perceiver-MoE.

Routing does not look at token features: each segment of a sequence carries a fixed 8-bit attribute row
(which modalities the task's input has, the segment's modality, whether it is a target, whether it is
causal). A gate maps the row to top-k experts, and the chosen experts' *weights* are merged into one
linear layer per segment. All of the expert math is in :func:`route` and :func:`merge_experts`. A folded model
(:mod:`uniperceiver_cli.model.folding`) stores each row's merged linear and routes with :class:`FoldedGate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from uniperceiver_cli.model.config import MoEConfig

# Attribute rows of the reference (bits: input has visual, input has text, reserved, always 1,
# segment is visual, segment is text, segment is a target, segment is causal).
ATTRIBUTES: dict[str, tuple[int, ...]] = {
    "visual_input": (1, 0, 0, 1, 1, 0, 0, 0),  # classification and retrieval inputs, image or video
    "text_input": (0, 1, 0, 1, 0, 1, 0, 0),  # MLM and text classification inputs
    "caption_visual": (1, 1, 0, 1, 1, 0, 0, 0),  # SPE + image/video part of a captioning input
    "caption_text": (1, 1, 0, 1, 0, 1, 0, 1),  # the causal text part of a captioning input
    "text_target": (1, 0, 0, 1, 0, 1, 1, 0),  # class names, retrieval captions
    "vocabulary": (1, 1, 0, 1, 0, 1, 1, 0),  # the vocabulary and label-word target sets
}
_ROW_INDEX = {name: i for i, name in enumerate(ATTRIBUTES)}


@dataclass(frozen=True)
class Routing:
    """Attribute rows of one encoder call: row r covers tokens [bounds[r-1], bounds[r]) of the call.

    ``rows`` name entries of :data:`ATTRIBUTES`; the first row also covers the <|spe|> prefix.
    """

    rows: tuple[str, ...]
    bounds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.bounds) != len(self.rows) - 1:
            raise ValueError(f"{len(self.rows)} attribute rows need {len(self.rows) - 1} bounds")
        unknown = [r for r in self.rows if r not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"unknown attribute row(s) {unknown}; known: {', '.join(ATTRIBUTES)}")

    def spans(self, length: int) -> list[tuple[int, int]]:
        edges = (0, *self.bounds, length)
        return list(zip(edges[:-1], edges[1:], strict=True))


class AttributeGate(nn.Module):
    """attribute row -> LayerNorm(Linear) -> router logits over the experts."""

    def __init__(self, width: int, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.tag_proj = nn.Linear(config.attribute_length, width)
        self.tag_norm = nn.LayerNorm(width)
        self.router = nn.Linear(width, config.num_experts, bias=False)
        # Every known row, kept on the model's device so routing never copies from the host.
        self.register_buffer("table", torch.tensor(list(ATTRIBUTES.values()), dtype=torch.float32), persistent=False)
        self.shard: ExpertShard | None = None  # expert parallelism: the group whose processes route alike

    def forward(self, rows: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Named attribute rows -> (expert ids (R, k), gate values (R, k))."""
        attributes = torch.stack([self.table[_ROW_INDEX[r]] for r in rows]).to(self.tag_proj.weight.dtype)
        logits = self.router(self.tag_norm(self.tag_proj(attributes)))
        return route(logits.float(), self.config, training=self.training, shard=self.shard)


class FoldedGate(nn.Module):
    """The gate of a folded layer, whose "expert" r is row r's merged linear: row r -> expert r with gate 1, so
    :func:`merge_experts` returns that linear exactly. No parameters."""

    def __init__(self) -> None:
        super().__init__()
        # Row indices, kept on the model's device like AttributeGate's table. (len(ATTRIBUTES), 1)
        self.register_buffer("ids", torch.arange(len(ATTRIBUTES))[:, None], persistent=False)

    def forward(self, rows: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Named attribute rows -> (their row indices (R, 1), ones (R, 1))."""
        ids = torch.stack([self.ids[_ROW_INDEX[r]] for r in rows])
        return ids, torch.ones(ids.shape, device=ids.device)


@dataclass(frozen=True)
class ExpertShard:
    """Expert parallelism: this process holds experts [first, first + count) of every MoE layer; the others are
    on the other processes of ``group`` (DeepSpeed's expert-parallel group), whose first process is global rank
    ``src``."""

    first: int
    count: int
    group: Any  # a torch.distributed ProcessGroup
    src: int


def _shared(noise: torch.Tensor, shard: ExpertShard | None) -> torch.Tensor:
    """Under expert parallelism every process of the group must route alike: they all take ``src``'s noise."""
    if shard is not None:
        torch.distributed.broadcast(noise, src=shard.src, group=shard.group)
    return noise


def route(logits: torch.Tensor, config: MoEConfig, training: bool,
          shard: ExpertShard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of (R, E) logits; noise only in training.

    'vmoe' adds N(0, (noise_std / E)^2) and takes gates from the noisy softmax; 'gumbel' selects on
    Gumbel-perturbed logits and takes gates from the clean softmax. With k >= 2 the k gates are
    renormalised to sum to 1 (the reference); with k = 1 the gate is the plain softmax probability, so
    the router still receives a gradient (the reference's top-1 path returned nothing).
    """
    select = probs_from = logits
    if training and config.noise_policy == "vmoe":
        noise = _shared(torch.randn_like(logits), shard)
        select = probs_from = logits + noise * (config.noise_std / config.num_experts)
    elif training and config.noise_policy == "gumbel":
        u = _shared(torch.rand_like(logits), shard).clamp(1e-9, 1 - 1e-9)
        select = logits - torch.log(-torch.log(u))
    probs = probs_from.softmax(dim=-1)
    ids = select.topk(config.top_k, dim=-1).indices
    gates = probs.gather(-1, ids)
    if config.top_k > 1:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return ids, gates


def merge_experts(weight: torch.Tensor, bias: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor,
                  shard: ExpertShard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear combination of the chosen experts: W_r = sum_k g_rk W[ids_rk] (and likewise the bias).

    weight (E, out, in), bias (E, out), ids and gates (R, k) -> (R, out, in), (R, out).

    Under expert parallelism (``shard``) ``weight`` holds only this process's experts: each process merges the
    chosen experts it holds (the others with gate 0) and the partial merges are summed over the group. Every
    process of the group routes the same rows (one task per step), so all get the whole W_r: the weights move,
    not the tokens, and each segment still runs one linear. The sum's backward sums the gradient of W_r over the
    group, which is what the experts' owners need (DeepSpeed then reduces expert gradients over the
    expert-data-parallel group and divides by the world size, as for every other gradient).
    """
    if shard is not None:
        local = (ids >= shard.first) & (ids < shard.first + shard.count)
        gates = torch.where(local, gates, torch.zeros_like(gates))
        ids = (ids - shard.first).clamp(0, shard.count - 1)
    g = gates.to(weight.dtype)
    merged_w = (g[:, :, None, None] * weight[ids]).sum(dim=1)
    merged_b = (g[:, :, None] * bias[ids]).sum(dim=1)
    if shard is not None:
        from torch.distributed.nn.functional import all_reduce

        flat = all_reduce(torch.cat([merged_w.flatten(1), merged_b], dim=1), group=shard.group)
        merged_w, merged_b = flat[:, :-merged_b.shape[1]].view_as(merged_w), flat[:, -merged_b.shape[1]:]
    return merged_w, merged_b


def shard_experts(model: nn.Module, shard: ExpertShard) -> None:
    """Keep only this process's experts in every :class:`ExpertLinear` of ``model`` (and route with the group)."""
    for module in model.modules():
        if isinstance(module, ExpertLinear):
            part = slice(shard.first, shard.first + shard.count)
            module.weight = nn.Parameter(module.weight.detach()[part].clone())
            module.bias = nn.Parameter(module.bias.detach()[part].clone())
            module.shard = shard
        elif isinstance(module, AttributeGate):
            module.shard = shard


def gather_experts(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every expert of every sharded :class:`ExpertLinear`, stacked from the group's processes in expert order:
    ``{state-dict key: (E, ...)}``. A collective: every process of the group calls it."""
    full = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertLinear) and module.shard is not None:
            size = torch.distributed.get_world_size(module.shard.group)
            for key in ("weight", "bias"):
                local = getattr(module, key).detach().contiguous()
                parts = [torch.empty_like(local) for _ in range(size)]
                torch.distributed.all_gather(parts, local, group=module.shard.group)
                full[f"{name}.{key}"] = torch.cat(parts)
    return full


class ExpertLinear(nn.Module):
    """E copies of a linear layer; each routed segment runs one linear with its merged weights."""

    def __init__(self, in_features: int, out_features: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_features))
        bound = math.sqrt(6 / (in_features + out_features))
        nn.init.uniform_(self.weight, -bound, bound)
        self.shard: ExpertShard | None = None  # expert parallelism: which experts this process holds

    def forward(self, x: torch.Tensor, decision: tuple[torch.Tensor, torch.Tensor],
                spans: list[tuple[int, int]]) -> torch.Tensor:
        """x (B, S, in); one (start, end) span per routed row, along S."""
        weight, bias = merge_experts(self.weight, self.bias, *decision, self.shard)
        if len(spans) == 1:
            return F.linear(x, weight[0], bias[0])
        return torch.cat([F.linear(x[:, a:b], weight[r], bias[r]) for r, (a, b) in enumerate(spans)], dim=1)
