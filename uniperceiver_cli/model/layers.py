"""The shared Transformer: pre-LN blocks with LayerScale, drop path and (optionally) expert linears."""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from uniperceiver_cli.model.config import ModelConfig
from uniperceiver_cli.model.moe import (
    Decision,
    ExpertLinear,
    FeatureGate,
    RouterLog,
    Routing,
    Segments,
    folded_entries,
    make_gate,
)

KV = tuple[torch.Tensor, torch.Tensor]  # keys and values, each (B, H, L, head_dim)


def _linears(config: ModelConfig, moe: bool, *shapes: tuple[int, int]) -> list[nn.Module | None]:
    """A sub-layer's linears (in, out) and then its gate: expert linears and a gate, or plain ones and None.
    Folded, the "experts" are the merged linears of the attribute rows, modalities or tasks."""
    if not moe:
        return [*(nn.Linear(i, o) for i, o in shapes), None]
    assert config.moe is not None
    experts = folded_entries(config.moe) if config.moe.folded else config.moe.num_experts
    return [*(ExpertLinear(i, o, experts) for i, o in shapes), make_gate(config.width, config.moe)]


class _Routed(nn.Module):
    """Base of the two sub-layers that may hold experts: one gate decision serves both of their linears."""

    gate: nn.Module | None

    def _decide(self, routing: Routing | None, x: torch.Tensor) -> Decision | None:
        if self.gate is None:
            return None
        if routing is None:
            raise ValueError("a mixture-of-experts layer needs the sequence's attribute routing")
        return self.gate.decide(routing, x)

    @staticmethod
    def _linear(layer: nn.Module, x: torch.Tensor, decision: Decision | None) -> torch.Tensor:
        return layer(x) if decision is None else layer(x, decision)


class Attention(_Routed):
    def __init__(self, config: ModelConfig, moe: bool) -> None:
        super().__init__()
        d = config.width
        self.heads = config.heads
        self.qkv, self.out, self.gate = _linears(config, moe, (d, 3 * d), (d, d))

    def _split(self, qkv: torch.Tensor) -> torch.Tensor:
        return qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # (3, B, H, S, head_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, routing: Routing | None,
                past: KV | None = None, prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, KV]:
        """x (B, S, D), already normed. ``prefix`` (P, D), normed, is prepended to keys and values only;
        ``past`` holds the keys/values of earlier tokens. Returns the output and all keys/values seen."""
        decision = self._decide(routing, x)
        q, k, v = self._split(self._linear(self.qkv, x, decision))
        if prefix is not None:
            first = self._prefix_decision(routing, decision, prefix)
            pk, pv = self._split(self._linear(self.qkv, prefix[None], first))[1:]
            k = torch.cat([pk.expand(x.shape[0], -1, -1, -1), k], dim=2)
            v = torch.cat([pv.expand(x.shape[0], -1, -1, -1), v], dim=2)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self._linear(self.out, out.transpose(1, 2).flatten(2), decision), (k, v)

    def _prefix_decision(self, routing: Routing | None, decision: Decision | None,
                         prefix: torch.Tensor) -> Decision | None:
        """The deep prompts' routing: the first segment's decision, or (token, context) their own."""
        if decision is None:
            return None
        if isinstance(decision, Segments):
            return Segments(decision.ids[:1], decision.gates[:1], [(0, prefix.shape[0])])
        return self.gate.decide(Routing(routing.rows[:1], task=routing.task), prefix[None])


class MLP(_Routed):
    def __init__(self, config: ModelConfig, moe: bool) -> None:
        super().__init__()
        d, h = config.width, config.mlp_dim
        self.fc1, self.fc2, self.gate = _linears(config, moe, (d, h), (h, d))

    def forward(self, x: torch.Tensor, routing: Routing | None) -> torch.Tensor:
        decision = self._decide(routing, x)
        return self._linear(self.fc2, F.gelu(self._linear(self.fc1, x, decision)), decision)


class Block(nn.Module):
    """x += g1 * DropPath(Attn(LN1(x))); x += g2 * DropPath(MLP(LN2(x)))."""

    def __init__(self, config: ModelConfig, moe: bool) -> None:
        super().__init__()
        d = config.width
        self.norm1 = nn.LayerNorm(d)
        self.attn = Attention(config, moe)
        self.gamma1 = nn.Parameter(torch.full((d,), config.layer_scale_init))
        self.norm2 = nn.LayerNorm(d)
        self.mlp = MLP(config, moe)
        self.gamma2 = nn.Parameter(torch.full((d,), config.layer_scale_init))
        self.drop_path = DropPath(config.drop_path) if config.drop_path > 0 else nn.Identity()
        p = config.prompt
        self.prompt = nn.Parameter(torch.zeros(p.deep_prompt_length, d)) if p.deep_prompt_length else None
        separate = p.deep_prompt_length and p.separate_target_prompts
        self.target_prompt = nn.Parameter(torch.zeros(p.deep_prompt_length, d)) if separate else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, routing: Routing | None,
                past: KV | None = None, side: str = "input") -> tuple[torch.Tensor, KV]:
        prompt = None
        if past is None and self.prompt is not None:  # with a cache, the prompts already sit in `past`
            prompt = self.target_prompt if side == "target" and self.target_prompt is not None else self.prompt
            prompt = self.norm1(prompt)
        a, kv = self.attn(self.norm1(x), mask, routing, past, prompt)
        x = x + self.drop_path(self.gamma1 * a)
        x = x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x), routing))
        return x, kv


# ---------------------------------------------------------------------------------------- activation checkpointing
class _RecomputedLogs:
    """What a checkpointed block's token- and context-routed gates log into while the backward pass runs the block
    again: a throwaway :class:`RouterLog` where they logged in the first pass, nothing where they did not.

    Their calls were counted in the first pass, so recording them again would count them twice. But the
    recomputation must save the same tensors in the same order as the first pass (checkpoint pairs them by
    position), and a record saves some (its losses' softmax and logsumexp, which the router losses backpropagate
    through), so a gate that logged then records again, into a log nobody reads. Whether it logged is taken when the
    block runs, not at the backward, which runs after ``UniPerceiver.router_log()`` has closed. A class, not a
    generator: it is entered again if the graph is run backward twice (``retain_graph``)."""

    def __init__(self, gates: list[FeatureGate]) -> None:
        self.gates = gates
        self.logged = [gate.log is not None for gate in gates]
        self.outside: list[RouterLog | None] = []

    def __enter__(self) -> None:
        self.outside = [gate.log for gate in self.gates]
        for gate, logged in zip(self.gates, self.logged, strict=True):
            gate.log = RouterLog() if logged else None

    def __exit__(self, *exc: object) -> None:
        for gate, log in zip(self.gates, self.outside, strict=True):
            gate.log = log


def _contexts(gates: list[FeatureGate]) -> tuple[contextlib.AbstractContextManager, _RecomputedLogs]:
    """checkpoint's ``context_fn``, called as the block runs: nothing around the first pass, the gates' logs
    around the recomputation."""
    return contextlib.nullcontext(), _RecomputedLogs(gates)


def _block_output(block: Block, x: torch.Tensor, mask: torch.Tensor | None, routing: Routing | None,
                  side: str) -> torch.Tensor:
    return block(x, mask, routing, None, side)[0]  # the keys/values are dropped here: only decoding reads them


def checkpointed_block(block: Block, x: torch.Tensor, mask: torch.Tensor | None, routing: Routing | None,
                       side: str = "input") -> torch.Tensor:
    """``block(x, mask, routing, side=side)[0]`` keeping only the block's inputs for the backward pass, which runs
    the block again (activation checkpointing). No keys/values come back: returned, they would keep each layer's
    fused QKV output alive (k and v are views of it), three times what checkpointing keeps.

    Non-reentrant checkpointing restores the RNG state (CPU and the inputs' device) before the recomputation, so
    drop path and the gates' noise draw what they drew in the first pass, and the gradients are those of the
    plain block."""
    gates = [m for m in block.modules() if isinstance(m, FeatureGate)]
    return checkpoint(_block_output, block, x, mask, routing, side, use_reentrant=False,
                      context_fn=functools.partial(_contexts, gates))
