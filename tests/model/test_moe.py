"""Attribute routing: gate math, expert merging, and training with top-1 and top-2."""

import pytest
import torch

import uniperceiver_cli as up
from uniperceiver_cli.model.config import MoEConfig
from uniperceiver_cli.model.moe import ATTRIBUTES, AttributeGate, ExpertLinear, Routing, Segments, merge_experts, route


def test_top2_gates_are_renormalised_and_top1_keeps_the_probability():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    probs = logits.softmax(-1)
    ids, gates = route(logits, MoEConfig(num_experts=4, top_k=2), training=False)
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(gates, probs[:, [1, 2]] / probs[:, [1, 2]].sum())
    ids, gates = route(logits, MoEConfig(num_experts=4, top_k=1), training=False)
    assert ids.tolist() == [[1]]
    torch.testing.assert_close(gates, probs[:, [1]])


def test_noise_only_in_training():
    logits = torch.zeros(1, 8)
    config = MoEConfig(num_experts=8, top_k=2, noise_policy="vmoe")
    assert route(logits, config, training=False)[0].tolist() == route(logits, config, training=False)[0].tolist()
    torch.manual_seed(0)
    picks = {tuple(route(logits, config, training=True)[0][0].tolist()) for _ in range(20)}
    assert len(picks) > 1
    gumbel = MoEConfig(num_experts=8, top_k=2, noise_policy="gumbel")
    ids, gates = route(torch.tensor([[0.0, 0, 0, 0, 0, 0, 0, 9.0]]), gumbel, training=True)
    assert 7 in ids.tolist()[0] and torch.isclose(gates.sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="noise_policy"):
        route(logits, MoEConfig(noise_policy="loud"), training=True)


def test_merging_weights_equals_mixing_outputs():
    torch.manual_seed(0)
    layer = ExpertLinear(6, 5, num_experts=4)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 7, 6)
    ids, gates = torch.tensor([[1, 3], [0, 2]]), torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    out = layer(x, Segments(ids, gates, [(0, 3), (3, 7)]))
    for row, (a, b) in enumerate([(0, 3), (3, 7)]):
        mixed = sum(g * torch.nn.functional.linear(x[:, a:b], layer.weight[e], layer.bias[e])
                    for e, g in zip(ids[row].tolist(), gates[row].tolist(), strict=True))
        torch.testing.assert_close(out[:, a:b], mixed)
    w, b = merge_experts(layer.weight, layer.bias, ids, gates)
    assert w.shape == (2, 5, 6) and b.shape == (2, 5)


def test_gate_reads_the_reference_attribute_rows():
    gate = AttributeGate(16, MoEConfig(num_experts=4))
    rows = ("caption_visual", "caption_text")
    attributes = torch.tensor([ATTRIBUTES[r] for r in rows], dtype=torch.float32)
    expected = gate.router(gate.tag_norm(gate.tag_proj(attributes))).softmax(-1)
    ids, gates = gate.eval()(rows)
    torch.testing.assert_close(ids, expected.topk(2).indices)
    top = expected.topk(2).values
    torch.testing.assert_close(gates, top / top.sum(-1, keepdim=True))
    assert ATTRIBUTES["caption_text"] == (1, 1, 0, 1, 0, 1, 0, 1)
    assert ATTRIBUTES["vocabulary"] == (1, 1, 0, 1, 0, 1, 1, 0)


def test_routing_rows_and_spans():
    routing = Routing(("caption_visual", "caption_text"), (5,))
    assert routing.spans(9) == [(0, 5), (5, 9)]
    with pytest.raises(ValueError, match="need 1 bounds"):
        Routing(("caption_visual", "caption_text"))
    with pytest.raises(ValueError, match="unknown attribute row"):
        Routing(("audio",))


@pytest.mark.parametrize("top_k", [1, 2])
def test_top_k_trains_experts_and_gates(top_k):
    torch.manual_seed(0)
    model = up.create_model("tiny-moe", image_size=32, moe={"top_k": top_k}).train()
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(0, 1000, (2, 5))
    logits = model.retrieval_logits(images, ids)
    target = torch.arange(2)
    loss = torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)
    loss.backward()
    for i in (0, 2):  # the MoE layers of the "odd" location
        block = model.blocks[i]
        for gate in (block.attn.gate, block.mlp.gate):
            assert gate.router.weight.grad.abs().sum() > 0
            assert gate.tag_proj.weight.grad.abs().sum() > 0
        for expert_linear in (block.attn.qkv, block.attn.out, block.mlp.fc1, block.mlp.fc2):
            used = expert_linear.weight.grad.flatten(1).abs().sum(1) > 0
            assert 1 <= int(used.sum()) <= 2 * top_k  # visual input and text target rows each pick top_k
    assert model.blocks[1].attn.gate is None


def test_moe_eval_is_deterministic():
    torch.manual_seed(0)
    model = up.create_model("tiny-moe", image_size=32).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), model.encode_image(images))
