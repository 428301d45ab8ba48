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

    def forward(self, rows: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Named attribute rows -> (expert ids (R, k), gate values (R, k))."""
        attributes = torch.stack([self.table[_ROW_INDEX[r]] for r in rows]).to(self.tag_proj.weight.dtype)
        logits = self.router(self.tag_norm(self.tag_proj(attributes)))
        return route(logits.float(), self.config, training=self.training)


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


def route(logits: torch.Tensor, config: MoEConfig, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of (R, E) logits; noise only in training.

    'vmoe' adds N(0, (noise_std / E)^2) and takes gates from the noisy softmax; 'gumbel' selects on
    Gumbel-perturbed logits and takes gates from the clean softmax. With k >= 2 the k gates are
    renormalised to sum to 1 (the reference); with k = 1 the gate is the plain softmax probability, so
    the router still receives a gradient (the reference's top-1 path returned nothing).
    """
    select = probs_from = logits
    if training and config.noise_policy == "vmoe":
        select = probs_from = logits + torch.randn_like(logits) * (config.noise_std / config.num_experts)
    elif training and config.noise_policy == "gumbel":
        u = torch.rand_like(logits).clamp(1e-9, 1 - 1e-9)
        select = logits - torch.log(-torch.log(u))
    probs = probs_from.softmax(dim=-1)
    ids = select.topk(config.top_k, dim=-1).indices
    gates = probs.gather(-1, ids)
    if config.top_k > 1:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return ids, gates


def merge_experts(weight: torch.Tensor, bias: torch.Tensor, ids: torch.Tensor,
                  gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear combination of the chosen experts: W_r = sum_k g_rk W[ids_rk] (and likewise the bias).

    weight (E, out, in), bias (E, out), ids and gates (R, k) -> (R, out, in), (R, out).
    """
    g = gates.to(weight.dtype)
    merged_w = (g[:, :, None, None] * weight[ids]).sum(dim=1)
    merged_b = (g[:, :, None] * bias[ids]).sum(dim=1)
    return merged_w, merged_b


class ExpertLinear(nn.Module):
    """E copies of a linear layer; each routed segment runs one linear with its merged weights."""

    def __init__(self, in_features: int, out_features: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_features))
        bound = math.sqrt(6 / (in_features + out_features))
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, decision: tuple[torch.Tensor, torch.Tensor],
                spans: list[tuple[int, int]]) -> torch.Tensor:
        """x (B, S, in); one (start, end) span per routed row, along S."""
        weight, bias = merge_experts(self.weight, self.bias, *decision)
        if len(spans) == 1:
            return F.linear(x, weight[0], bias[0])
        return torch.cat([F.linear(x[:, a:b], weight[r], bias[r]) for r, (a, b) in enumerate(spans)], dim=1)
