"""Conditional mixture of experts, as in Uni-Perceiver-MoE, at the routing levels its paper compares.

What a gate sees is ``moe.routing``:

- "attribute" (the reference's): each segment of a sequence carries a fixed 8-bit attribute row (which modalities
  the task's input has, the segment's modality, whether it is a target, whether it is causal);
- "modality": only the segment's modality (visual or text), a learned logits row each;
- "task": only the call's task (:attr:`Routing.task`), a learned logits row per training task;
- "token": each token's hidden state (a linear router, GShard/Switch style);
- "context": one global feature per sample, the mean of its hidden states.

The first three decide once per segment, independently of the data, and the chosen experts' *weights* are merged
into one linear per segment (:func:`merge_experts`); a folded model (:mod:`uniperceiver_cli.model.folding`)
stores those merged linears and routes with :class:`FoldedGate`. Token and context routing decide per token, so
the tokens are sent to their experts GShard-style with fixed shapes: :func:`plan_dispatch` places each choice in
an (E, C, D) buffer, :func:`dispatch` fills it, :func:`expert_compute` runs every expert as one batched matmul and
:func:`combine` sums the gated outputs back per token. Both linears of a sub-layer share one decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from uniperceiver_cli.model.config import MoEConfig

# Attribute rows of the reference (bits: input has visual, input has text, reserved, always 1,
# segment is visual, segment is text, segment is a target, segment is causal).
ATTRIBUTES: dict[str, tuple[int, ...]] = {
    "visual_input": (1, 0, 0, 1, 1, 0, 0, 0),  # classification and retrieval inputs, image or video
    "text_input": (0, 1, 0, 1, 0, 1, 0, 0),  # MLM and text classification inputs
    "caption_visual": (1, 1, 0, 1, 1, 0, 0, 0),  # SPE + image/video part of a captioning or VQA input
    "caption_text": (1, 1, 0, 1, 0, 1, 0, 1),  # the causal text part of a captioning input
    "text_target": (1, 0, 0, 1, 0, 1, 1, 0),  # class names, retrieval captions
    "vocabulary": (1, 1, 0, 1, 0, 1, 1, 0),  # the vocabulary, label-word and VQA answer target sets
    # Not in the reference (its VQA has no row): the question of a VQA input, by the bits' meaning an input text
    # segment (b5), not a target or causal (b6, b7 clear), of a task whose input has an image and text (b0, b1).
    "vqa_question": (1, 1, 0, 1, 0, 1, 0, 0),
}
_ROW_INDEX = {name: i for i, name in enumerate(ATTRIBUTES)}
MODALITIES = ("visual", "text")
# The modality of each attribute row: its "segment is visual" bit (b4) set or not.
_ROW_MODALITY = tuple(0 if bits[4] else 1 for bits in ATTRIBUTES.values())
# One attribute row of each modality, in MODALITIES order: what folding merges a modality-routed model for.
MODALITY_ROWS = ("visual_input", "text_input")


@dataclass(frozen=True)
class Routing:
    """What the gates of one encoder call see: row r covers tokens [bounds[r-1], bounds[r]) of the call.

    ``rows`` name entries of :data:`ATTRIBUTES`; the first row also covers the <|spe|> prefix. ``task`` is the
    call's task (task routing); ``padding`` (B, S), True at padded tokens, keeps those out of token and context
    routing. The encoder fills both from the model (``UniPerceiver.routing_task``) and its ``padding``.
    """

    rows: tuple[str, ...]
    bounds: tuple[int, ...] = ()
    task: str | None = None
    padding: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.bounds) != len(self.rows) - 1:
            raise ValueError(f"{len(self.rows)} attribute rows need {len(self.rows) - 1} bounds")
        unknown = [r for r in self.rows if r not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"unknown attribute row(s) {unknown}; known: {', '.join(ATTRIBUTES)}")

    def spans(self, length: int) -> list[tuple[int, int]]:
        edges = (0, *self.bounds, length)
        return list(zip(edges[:-1], edges[1:], strict=True))


def task_index(tasks: list[str], task: str | None) -> int:
    """The row of ``task`` among the routed ``tasks``.

    Raises:
        ValueError: ``task`` is None or not routed (task routing cannot serve a task it was not trained on).
    """
    routed = ", ".join(tasks)
    if task is None:
        raise ValueError(f"task routing needs the call's task, one of the routed tasks ({routed}): pass "
                         f"--routing-task NAME (Python: run the calls inside model.routing_task(name))")
    if task not in tasks:
        raise ValueError(f"task routing cannot serve task {task!r}: its experts are routed only for the training "
                         f"tasks {routed}")
    return tasks.index(task)


# ---------------------------------------------------------------------------------------- decisions
@dataclass
class Segments:
    """A data-independent decision: segment r (tokens [a, b) of ``spans[r]``) runs its chosen experts, merged."""

    ids: torch.Tensor  # (R, k) expert ids
    gates: torch.Tensor  # (R, k) their gate values
    spans: list[tuple[int, int]]


@dataclass
class Dispatch:
    """A token-level decision: where each token's choices sit in the (E, C, ...) expert buffer.

    Choice j of token t goes to slot ``slots[j, t]`` = e * C + its position at expert e, or to the spare slot
    E * C, read back as zeros, when it is dropped (expert e already holds C choices) or the token is padding.
    """

    slots: torch.Tensor  # (k, T)
    weights: torch.Tensor  # (k, T) the choice's gate; 0 where dropped or padding
    kept: torch.Tensor  # (k, T) bool
    num_experts: int
    capacity: int


Decision = Segments | Dispatch


class ExpertGroup(Protocol):
    """Expert parallelism as the model sees it (:class:`~uniperceiver_cli.parallel.experts.ExpertShard` runs it):
    this process holds experts [first, first + count) of the ``total`` of every MoE layer, the group's other processes
    the rest. ``share``: the group's first process's tensor, on every one (gate noise: they route alike); ``sum``: the
    sum over the group; ``exchange``: all-to-all, block r of an (n x m, ...) tensor to process r and block r back from
    it (both autograd-aware); ``largest``: the group's maximum, without gradient; ``gather``: every process's
    experts stacked in expert order (for checkpoints and evaluation, outside the forward pass)."""

    first: int
    count: int
    total: int

    def share(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def sum(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def exchange(self, buffer: torch.Tensor) -> torch.Tensor: ...
    def largest(self, value: torch.Tensor) -> torch.Tensor: ...
    def gather(self, local: torch.Tensor) -> torch.Tensor: ...


def _shared(noise: torch.Tensor, group: ExpertGroup | None) -> torch.Tensor:
    """Under expert parallelism every process of the group must route alike: they all take the first one's noise."""
    return noise if group is None else group.share(noise)


def route(logits: torch.Tensor, config: MoEConfig, training: bool,
          group: ExpertGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of (R, E) logits; noise only in training.

    'vmoe' adds N(0, (noise_std / E)^2) and takes gates from the noisy softmax; 'gumbel' selects on
    Gumbel-perturbed logits and takes gates from the clean softmax. With k >= 2 the k gates are
    renormalised to sum to 1 (the reference); with k = 1 the gate is the plain softmax probability, so
    the router still receives a gradient (the reference's top-1 path returned nothing).
    """
    select = probs_from = logits
    if training and config.noise_policy == "vmoe":
        noise = _shared(torch.randn_like(logits), group)
        select = probs_from = logits + noise * (config.noise_std / config.num_experts)
    elif training and config.noise_policy == "gumbel":
        u = _shared(torch.rand_like(logits), group).clamp(1e-9, 1 - 1e-9)
        select = logits - torch.log(-torch.log(u))
    probs = probs_from.softmax(dim=-1)
    ids = select.topk(config.top_k, dim=-1).indices
    gates = probs.gather(-1, ids)
    if config.top_k > 1:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return ids, gates


def merge_experts(weight: torch.Tensor, bias: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor,
                  group: ExpertGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear combination of the chosen experts: W_r = sum_k g_rk W[ids_rk] (and likewise the bias).

    weight (E, out, in), bias (E, out), ids and gates (R, k) -> (R, out, in), (R, out).

    Under expert parallelism (``group``) ``weight`` holds only this process's experts: each process merges the
    chosen experts it holds (the others with gate 0) and the partial merges are summed over the group. Every
    process of the group routes the same rows (one task per step), so all get the whole W_r: the weights move,
    not the tokens, and each segment still runs one linear. The sum's backward sums the gradient of W_r over the
    group, which is what the experts' owners need (DeepSpeed then reduces expert gradients over the
    expert-data-parallel group and divides by the world size, as for every other gradient).
    """
    experts = weight.shape[0] if group is None else group.total
    # The gates as a dense (R, E) matrix: the merge is one small matmul over the experts, whose backward writes
    # each expert's gradient once (indexing the chosen experts would scatter into a zeroed (E, out, in) per call).
    # In the weights' dtype, not autocast's: the merged linear is then cast like any other weight.
    g = torch.zeros(ids.shape[0], experts, dtype=weight.dtype, device=weight.device)
    g = g.scatter_add(1, ids, gates.to(weight.dtype))
    if group is not None:
        g = g[:, group.first:group.first + group.count]  # the experts held here
    with torch.autocast(weight.device.type, enabled=False):
        merged_w = (g @ weight.flatten(1)).view(-1, *weight.shape[1:])
        merged_b = g @ bias
    if group is not None:
        flat = group.sum(torch.cat([merged_w.flatten(1), merged_b], dim=1))
        merged_w, merged_b = flat[:, :-merged_b.shape[1]].view_as(merged_w), flat[:, -merged_b.shape[1]:]
    return merged_w, merged_b


# ---------------------------------------------------------------------------------------- token dispatch
def one_hot(ids: torch.Tensor, classes: int) -> torch.Tensor:
    """``F.one_hot(ids, classes)`` without its range check, which reads ``ids``' minimum and maximum back to the
    host (on the CPU; CUDA leaves it to a device assert): expert ids are in range by construction. (..., classes)
    long."""
    return (ids.unsqueeze(-1) == torch.arange(classes, device=ids.device)).long()


def expert_capacity(tokens: int, config: MoEConfig) -> int:
    """Choices each expert takes per call: ceil(capacity_factor * k * T / E), at most T; T when dropless (its
    upper bound: :func:`dropless_load` gives the depth a call needs)."""
    if config.capacity_factor is None:
        return tokens
    return min(tokens, math.ceil(config.capacity_factor * config.top_k * tokens / config.num_experts))


def plan_dispatch(ids: torch.Tensor, gates: torch.Tensor, valid: torch.Tensor | None, num_experts: int,
                  capacity: int) -> Dispatch:
    """Positions by a cumulative sum over one-hot choices, in choice-major order, so every token's first choice is
    placed before any second choice (GShard); tokens earlier in the call win a full expert.

    ids, gates (T, k); valid (T,) bool, False at padding (None: all tokens are real).
    """
    k, t = ids.shape[1], ids.shape[0]
    choice = one_hot(ids.t(), num_experts)  # (k, T, E)
    if valid is not None:
        choice = choice * valid[None, :, None]
    position = ((choice.flatten(0, 1).cumsum(0).view(k, t, num_experts) - 1) * choice).sum(-1)  # (k, T)
    kept = (choice.sum(-1) > 0) & (position < capacity)
    slots = torch.where(kept, ids.t() * capacity + position, num_experts * capacity)
    weights = torch.where(kept, gates.t(), torch.zeros((), dtype=gates.dtype, device=gates.device))
    return Dispatch(slots, weights, kept, num_experts, capacity)


def dispatch(x: torch.Tensor, plan: Dispatch) -> torch.Tensor:
    """Tokens (T, D) into the expert buffer (E, C, D); empty slots are zeros."""
    k, d = plan.slots.shape[0], x.shape[-1]
    buffer = x.new_zeros(plan.num_experts * plan.capacity + 1, d)  # + the spare slot of dropped choices
    buffer = buffer.index_copy(0, plan.slots.flatten(), x.repeat(k, 1))  # (k*T, D) in the slots' order
    return buffer[:-1].view(plan.num_experts, plan.capacity, d)


def expert_compute(buffer: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Every expert's linear on its slots as one batched matmul: buffer (E', C', in), weight (E', out, in) and
    bias (E', out), the experts held here (all E, or an expert-parallel slice) -> (E', C', out)."""
    return torch.baddbmm(bias[:, None, :].to(buffer.dtype), buffer, weight.transpose(1, 2).to(buffer.dtype))


def expert_parallel_compute(buffer: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            group: ExpertGroup) -> torch.Tensor:
    """:func:`expert_compute` when each process holds a share of the experts: an all-to-all (``group.exchange``,
    autograd-aware) sends the slots of expert e to e's owner, which runs its experts on the slots of every process
    of the group, and a second one sends the outputs back. buffer (E, C, in) with the group's common capacity C
    -> (E, C, out)."""
    n, (e, c, d) = group.total // group.count, buffer.shape
    received = group.exchange(buffer)  # (n * count, C, in): block r comes from process r
    local = received.view(n, group.count, c, d).transpose(0, 1).reshape(group.count, n * c, d)
    out = expert_compute(local, weight, bias)  # (count, n * C, out)
    out = out.view(group.count, n, c, -1).transpose(0, 1).reshape(e, c, -1)
    return group.exchange(out)


def dropless_load(ids: torch.Tensor, valid: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """The most choices any expert got in a call (at least 1), as a device scalar: the depth of a dropless
    (E, C) buffer, so no choice is dropped and none is deeper than needed (C = T would run every expert on every
    token). ids (T, k)."""
    choices = one_hot(ids, num_experts)  # (T, k, E)
    if valid is not None:
        choices = choices * valid[:, None, None]
    return choices.sum((0, 1)).max().clamp(min=1)


def agreed_capacity(capacity: int | torch.Tensor, group: ExpertGroup | None, device: torch.device) -> int:
    """The capacity as a number, the same on every process of an expert-parallel group (the all-to-all needs
    equal blocks): the largest of theirs. A fixed capacity needs no host sync outside expert parallelism; a
    dropless one (a device scalar) and any under expert parallelism need one, as in DeepSpeed's dropless gate."""
    if group is None and isinstance(capacity, int):
        return capacity
    largest = torch.as_tensor(capacity, device=device)
    return int(largest if group is None else group.largest(largest))


def combine(y: torch.Tensor, plan: Dispatch) -> torch.Tensor:
    """Expert outputs (E, C, out) back to the tokens: sum over each token's choices of gate x output. (T, out)"""
    flat = torch.cat([y.flatten(0, 1), y.new_zeros(1, y.shape[-1])])  # the spare slot reads zeros
    return (flat[plan.slots] * plan.weights[..., None].to(y.dtype)).sum(dim=0)


# ---------------------------------------------------------------------------------------- router losses
@dataclass
class RouterStats:
    """What the token- and context-routed gates reported over one forward (means over their calls)."""

    balance_loss: torch.Tensor  # E * sum_e f_e P_e (Switch / GShard); 1 when balanced
    z_loss: torch.Tensor  # mean of logsumexp(logits)^2 (ST-MoE)
    dropped_fraction: torch.Tensor  # of the real tokens' choices, those that found their expert full
    load: torch.Tensor  # (E,) each expert's share of the real tokens' choices, before capacity

    def metrics(self) -> dict[str, torch.Tensor]:
        """The values the training log records under moe/."""
        loads = {f"load_e{e}": value for e, value in enumerate(self.load.unbind())}
        return {"balance_loss": self.balance_loss, "z_loss": self.z_loss, "dropped_fraction": self.dropped_fraction,
                **loads}


def router_losses(logits: torch.Tensor, first: torch.Tensor, valid: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The load-balancing loss E * sum_e f_e P_e (f_e: the share of routed items whose first choice is e, P_e: the
    mean router probability of e) and the router z-loss, the mean of logsumexp(logits)^2, over the routed items.

    logits (N, E) float, first (N,) first choices, valid (N,) bool or None (all items count).
    """
    weight = torch.ones(logits.shape[0], device=logits.device) if valid is None else valid.float()
    count = weight.sum().clamp(min=1)
    f = (one_hot(first, logits.shape[-1]).float() * weight[:, None]).sum(0) / count
    p = (logits.softmax(-1) * weight[:, None]).sum(0) / count
    z = (logits.logsumexp(-1).square() * weight).sum() / count
    return logits.shape[-1] * (f * p).sum(), z


class RouterLog:
    """Collects what the token- and context-routed gates report while it is attached to them
    (``UniPerceiver.router_log``); :meth:`stats` sums it up, on the device (nothing is read to the host)."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, ...]] = []  # balance, z, dropped, choices, per-expert choices (E,)

    def record(self, logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor | None, token_ids: torch.Tensor,
               token_valid: torch.Tensor | None, plan: Dispatch) -> None:
        """One gate call: the (N, E) logits and (N, k) choices of the routed items (tokens, or samples) with their
        validity, and the choices (T, k), validity and dispatch plan of the call's tokens."""
        balance, z = router_losses(logits, ids[:, 0], valid)
        chosen = one_hot(token_ids, plan.num_experts)  # (T, k, E)
        if token_valid is not None:
            chosen = chosen * token_valid[:, None, None]
        experts = chosen.sum((0, 1))  # (E,) the real tokens' choices of each expert
        choices = experts.sum()
        self.calls.append((balance, z, choices - plan.kept.sum(), choices, experts))

    def stats(self) -> RouterStats | None:
        """The means over the recorded calls (None when nothing was routed by token or context)."""
        if not self.calls:
            return None
        balance, z, dropped, choices, experts = (torch.stack(part) for part in zip(*self.calls, strict=True))
        total = choices.sum().clamp(min=1).float()
        return RouterStats(balance.mean(), z.mean(), dropped.sum() / total, experts.sum(0) / total)


# ---------------------------------------------------------------------------------------- gates
class _KeyedGate(nn.Module):
    """A data-independent gate: one decision per key of the call, its segments' attribute rows or its task."""

    by_task = False
    group: ExpertGroup | None = None  # expert parallelism: the group whose processes route alike

    def decide(self, routing: Routing, x: torch.Tensor) -> Segments:
        """The decision for a call on x (B, S, D)."""
        if self.by_task:
            return Segments(*self((routing.task,)), [(0, x.shape[1])])
        return Segments(*self(routing.rows), routing.spans(x.shape[1]))


class AttributeGate(_KeyedGate):
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
        return route(logits.float(), self.config, training=self.training, group=self.group)


class ModalityGate(_KeyedGate):
    """The segment's modality -> a learned row of router logits: (visual, text) x experts."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.logits = nn.Embedding(len(MODALITIES), config.num_experts)
        self.register_buffer("modality", torch.tensor(_ROW_MODALITY), persistent=False)

    def forward(self, rows: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Named attribute rows -> (expert ids (R, k), gate values (R, k)) by their modality alone."""
        modality = torch.stack([self.modality[_ROW_INDEX[r]] for r in rows])
        return route(self.logits(modality).float(), self.config, training=self.training, group=self.group)


class TaskGate(_KeyedGate):
    """The call's task -> a learned row of router logits: one per training task (``moe.tasks``)."""

    by_task = True

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        if not config.tasks:
            raise ValueError("moe.routing 'task' needs moe.tasks, the names of the tasks it routes (training fills "
                             "them from the recipe's tasks)")
        self.config, self.tasks = config, list(config.tasks)
        self.logits = nn.Embedding(len(config.tasks), config.num_experts)

    def forward(self, tasks: tuple[str | None, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Task names -> (expert ids (R, k), gate values (R, k)). Raises ValueError for a task not routed."""
        logits = torch.cat([self.logits.weight[i:i + 1] for i in (task_index(self.tasks, t) for t in tasks)])
        return route(logits.float(), self.config, training=self.training, group=self.group)


class FoldedGate(_KeyedGate):
    """The gate of a folded layer, whose "expert" i is key i's merged linear (an attribute row's, a modality's or a
    task's): key i -> expert i with gate 1, so :func:`merge_experts` returns that linear exactly. No parameters."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.by_task, self.tasks = config.routing == "task", list(config.tasks)
        # The entry of each key, kept on the model's device like AttributeGate's table: of each attribute row (its
        # own, or its modality's), or of each task in moe.tasks order. (keys, 1)
        entries = _ROW_MODALITY if config.routing == "modality" else range(folded_entries(config))
        self.register_buffer("ids", torch.tensor(list(entries))[:, None], persistent=False)

    def forward(self, keys: tuple[str | None, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Named attribute rows (or tasks) -> (their entries (R, 1), ones (R, 1))."""
        index = [task_index(self.tasks, k) if self.by_task else _ROW_INDEX[k] for k in keys]
        ids = torch.stack([self.ids[i] for i in index])
        return ids, torch.ones(ids.shape, device=ids.device)


def folded_entries(config: MoEConfig) -> int:
    """How many merged linears a folded expert linear holds: one per attribute row, modality or task."""
    return {"modality": len(MODALITIES), "task": len(config.tasks)}.get(config.routing, len(ATTRIBUTES))


class FeatureGate(nn.Module):
    """Token routing (each token's normed hidden state) or context routing (each sample's mean over the call's
    first segment, its non-padded tokens; every token of the sample then takes the sample's experts) ->
    Linear(D, E), no bias -> top-k -> a :class:`Dispatch` of the call's tokens.

    While a :class:`RouterLog` is attached (``log``), each call records its losses and loads there.
    """

    def __init__(self, width: int, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.per_sample = config.routing == "context"
        self.router = nn.Linear(width, config.num_experts, bias=False)
        self.log: RouterLog | None = None
        self.group: ExpertGroup | None = None  # expert parallelism: the group that must agree on the capacity

    def decide(self, routing: Routing, x: torch.Tensor) -> Dispatch:
        """The decision for a call on x (B, S, D)."""
        b, s, _ = x.shape
        valid = None if routing.padding is None else ~routing.padding  # (B, S)
        if self.per_sample:
            end = routing.bounds[0] if routing.bounds else s  # the context: what every token of the call may see
            part = x[:, :end] if valid is None else x[:, :end] * valid[:, :end, None]
            count = end if valid is None else valid[:, :end].sum(1, keepdim=True).clamp(min=1)
            logits = self.router(part.sum(1) / count).float()  # (B, E)
            ids, gates = route(logits, self.config, training=self.training)
            token_ids, token_gates = (v[:, None].expand(b, s, -1).flatten(0, 1) for v in (ids, gates))
            item_valid = None
        else:
            logits = self.router(x.flatten(0, 1)).float()  # (B*S, E)
            token_ids, token_gates = ids, gates = route(logits, self.config, training=self.training)
            item_valid = None if valid is None else valid.flatten()
        token_valid = None if valid is None else valid.flatten()
        capacity = expert_capacity(b * s, self.config)
        if self.config.capacity_factor is None:  # dropless: as deep as the fullest expert needs, no deeper
            capacity = dropless_load(token_ids, token_valid, self.config.num_experts)
        capacity = agreed_capacity(capacity, self.group, x.device)
        plan = plan_dispatch(token_ids, token_gates, token_valid, self.config.num_experts, capacity)
        if self.log is not None:
            self.log.record(logits, ids, item_valid, token_ids, token_valid, plan)
        return plan


GATES = (AttributeGate, ModalityGate, TaskGate, FeatureGate)


def make_gate(width: int, config: MoEConfig) -> nn.Module:
    """The gate of an MoE sub-layer for ``config.routing`` (a folded model's :class:`FoldedGate`)."""
    if config.folded:
        return FoldedGate(config)
    if config.routing == "attribute":
        return AttributeGate(width, config)
    if config.routing == "modality":
        return ModalityGate(config)
    if config.routing == "task":
        return TaskGate(config)
    return FeatureGate(width, config)


def shard_experts(model: nn.Module, group: ExpertGroup) -> None:
    """Keep only this process's experts in every :class:`ExpertLinear` of ``model`` (and route with the group)."""
    for module in model.modules():
        if isinstance(module, ExpertLinear):
            part = slice(group.first, group.first + group.count)
            module.weight = nn.Parameter(module.weight.detach()[part].clone())
            module.bias = nn.Parameter(module.bias.detach()[part].clone())
            module.group = group
        elif isinstance(module, (_KeyedGate, FeatureGate)):
            module.group = group


class ExpertLinear(nn.Module):
    """E copies of a linear layer. A data-independent decision runs one linear per segment with its experts'
    merged weights; a token-level one dispatches the tokens to their experts and combines the outputs."""

    def __init__(self, in_features: int, out_features: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_features))
        bound = math.sqrt(6 / (in_features + out_features))
        nn.init.uniform_(self.weight, -bound, bound)
        self.group: ExpertGroup | None = None  # expert parallelism: which experts this process holds

    def forward(self, x: torch.Tensor, decision: Decision) -> torch.Tensor:
        """x (B, S, in) -> (B, S, out)."""
        if isinstance(decision, Dispatch):
            buffer = dispatch(x.flatten(0, 1), decision)  # (E, C, in)
            if self.group is None:
                y = expert_compute(buffer, self.weight, self.bias)
            else:  # each process routes its own tokens: they travel to the experts' owners and back
                y = expert_parallel_compute(buffer, self.weight, self.bias, self.group)
            return combine(y, decision).view(*x.shape[:2], -1)
        weight, bias = merge_experts(self.weight, self.bias, decision.ids, decision.gates, self.group)
        if len(decision.spans) == 1:
            return F.linear(x, weight[0], bias[0])
        return torch.cat([F.linear(x[:, a:b], weight[r], bias[r]) for r, (a, b) in enumerate(decision.spans)], dim=1)
