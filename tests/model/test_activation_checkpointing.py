"""Activation checkpointing (``train.activation_checkpointing``): each encoder block keeps only its inputs and runs
again in the backward pass. The gradients must be those of the plain model, bit for bit: the recomputation repeats
the same operations on the same inputs with the RNG restored, and autograd's graph is the first pass's."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import uniperceiver_cli as up
from uniperceiver_cli.model.config import SPE_ID
from uniperceiver_cli.model.moe import RouterStats
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.train.recipe import validate

Step = Callable[[UniPerceiver, dict[str, torch.Tensor]], torch.Tensor]


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = True  # one padded caption and passage: the masks take part too
    selected = torch.zeros(3, 5, dtype=torch.bool)
    selected[:, 1] = True
    selected[2, 3] = True
    words = torch.randint(0, 300, (3, 5), generator=g)
    return {"images": torch.randn(3, 3, 32, 32, generator=g), "vocab": torch.arange(300), "words": words,
            "padding": padding, "selected": selected, "masked": words.masked_fill(selected, SPE_ID),
            "labels": torch.tensor([0, 5, 7])}


def _classification(model: UniPerceiver, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Images against the vocabulary target set, the target encoding trained too."""
    logits = model.classification_logits(data["images"], model.vocabulary_targets(data["vocab"][:20]))
    return F.cross_entropy(logits, data["labels"])


def _caption(model: UniPerceiver, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Teacher-forced captioning (the two-stream layout) against the vocabulary target set."""
    logits = model.caption_logits(data["images"], data["words"], data["padding"],
                                  model.vocabulary_targets(data["vocab"]))
    target = data["words"].masked_fill(data["padding"], -1)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-1)


def _mlm(model: UniPerceiver, data: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model.mlm_logits(data["masked"], data["padding"], data["selected"],
                              model.vocabulary_targets(data["vocab"]))
    return F.cross_entropy(logits, data["words"][data["selected"]])


def _all_tasks(model: UniPerceiver, data: dict[str, torch.Tensor]) -> torch.Tensor:
    return _classification(model, data) + _caption(model, data) + _mlm(model, data)


def _run(model: UniPerceiver, checkpointing: bool, step: Step, seed: int = 0,
         ) -> tuple[dict[str, torch.Tensor], RouterStats | None, torch.Tensor]:
    """One training micro-batch as the loop runs it: forward inside ``router_log``, the router losses added after
    it, the backward outside it. Returns every gradient, the router statistics and the loss."""
    model.activation_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with model.router_log() as routed:
        loss = step(model, _inputs())
    stats = routed.stats()
    if stats is not None:
        loss = loss + 0.01 * stats.balance_loss + 0.001 * stats.z_loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return grads, stats, loss.detach()


def _count_block_calls(model: UniPerceiver) -> list[int]:
    """Counts the blocks' runs as they start (a recomputation stops once it has what the backward needs)."""
    calls = [0]
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _assert_same(plain: dict[str, torch.Tensor], checkpointed: dict[str, torch.Tensor]) -> None:
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        assert torch.equal(grad, checkpointed[name]), f"{name}: max diff {(grad - checkpointed[name]).abs().max()}"


def _stats_equal(a: RouterStats | None, b: RouterStats | None) -> bool:
    if a is None or b is None:
        return a is b
    return all(torch.equal(x, y) for x, y in zip(a.metrics().values(), b.metrics().values(), strict=True))


@pytest.mark.parametrize("step", [_classification, _caption, _mlm])
def test_dense_gradients_are_identical_with_drop_path(step: Step):
    torch.manual_seed(0)
    model = up.create_model("tiny", image_size=32, drop_path=0.3).train()
    calls = _count_block_calls(model)
    plain, _, loss = _run(model, False, step)
    plain_calls = calls[0]
    checkpointed, _, checkpointed_loss = _run(model, True, step)
    assert calls[0] - plain_calls == 2 * plain_calls  # each block ran again in the backward: it was checkpointed
    assert torch.equal(loss, checkpointed_loss)
    _assert_same(plain, checkpointed)
    other, _, _ = _run(model, True, step, seed=1)  # the drop-path masks do change the gradients
    assert any(not torch.equal(other[name], grad) for name, grad in plain.items())


@pytest.mark.parametrize("routing", ["attribute", "token", "context"])
def test_moe_gradients_and_router_statistics_are_identical(routing: str):
    torch.manual_seed(0)
    model = up.create_model("tiny-moe", image_size=32, drop_path=0.3, moe={"routing": routing}).train()
    assert model.config.moe.noise_policy == "vmoe"  # the gates draw noise in training
    plain, plain_stats, loss = _run(model, False, _all_tasks)
    checkpointed, checkpointed_stats, checkpointed_loss = _run(model, True, _all_tasks)
    assert torch.equal(loss, checkpointed_loss)
    _assert_same(plain, checkpointed)
    assert (plain_stats is None) == (routing == "attribute")  # only token and context routing log
    assert _stats_equal(plain_stats, checkpointed_stats)


def test_the_recomputation_does_not_log_the_router_again():
    """A backward inside ``router_log`` recomputes the blocks while the log is attached: it records nothing more."""
    torch.manual_seed(0)
    model = up.create_model("tiny-moe", image_size=32, moe={"routing": "token"}).train()
    model.activation_checkpointing = True
    with model.router_log() as routed:
        _classification(model, _inputs()).backward()
        assert len(routed.calls) == 2 * 2 * 2  # 2 encoder calls x 2 MoE layers x (attention, MLP)
    assert all(gate.log is None for block in model.blocks for gate in (block.attn.gate, block.mlp.gate)
               if gate is not None)


def test_checkpointing_only_where_a_backward_can_follow():
    model = up.create_model("tiny", image_size=32)
    model.activation_checkpointing = True
    x = model.visual_prefix(torch.randn(1, 1, 3, 32, 32))
    past = model.eval().encode(x)[1]
    assert not model.checkpoints() and len(past) == 3  # evaluation keeps the keys/values
    model.train()
    assert model.checkpoints() and model.encode(x)[1] == []  # no keys/values: they would keep the QKV alive
    assert not model.checkpoints(past)  # cached decoding needs every layer's keys/values
    with torch.no_grad():
        assert not model.checkpoints() and len(model.encode(x)[1]) == 3
    model.activation_checkpointing = False
    assert not model.checkpoints()


def test_recipe_takes_the_key():
    recipe = {"name": "t", "stage": "pretrain", "tasks": [{"name": "c", "type": "image_classification", "data": "d"}]}
    assert validate(recipe).train.activation_checkpointing is False
    recipe["train"] = {"activation_checkpointing": True}
    assert validate(recipe).train.activation_checkpointing is True
