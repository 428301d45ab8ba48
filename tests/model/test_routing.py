"""The routing levels of Uni-Perceiver-MoE (moe.routing): router losses, dispatch with capacity, gradients, folding,
task-routing refusals, and a few training steps with evaluation at every level."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import uniperceiver_cli as up
from uniperceiver_cli.data.toyworld import generate
from uniperceiver_cli.evaluate.tasks import evaluate_task
from uniperceiver_cli.model.config import MoEConfig
from uniperceiver_cli.model.decoding import beam_search
from uniperceiver_cli.model.folding import dense_view, fold_experts
from uniperceiver_cli.model.moe import (
    ATTRIBUTES,
    ExpertLinear,
    FeatureGate,
    FoldedGate,
    RouterLog,
    Routing,
    plan_dispatch,
    router_losses,
)
from uniperceiver_cli.train.loop import train
from uniperceiver_cli.train.recipe import validate

LEVELS = ["attribute", "modality", "task", "token", "context"]
CLOSE = {"atol": 1e-5, "rtol": 0}


def _model(routing: str, **moe) -> up.UniPerceiver:
    torch.manual_seed(0)
    tasks = {"tasks": ["shape", "caption"]} if routing == "task" else {}
    return up.create_model("tiny-moe", image_size=32, moe={"routing": routing, "noise_policy": "none", **tasks,
                                                            **moe})


def _gate(config: MoEConfig, weight: list[list[float]]) -> FeatureGate:
    gate = FeatureGate(len(weight[0]), config).eval()
    with torch.no_grad():
        gate.router.weight.copy_(torch.tensor(weight))
    return gate


def test_balance_and_z_loss_equal_the_formulas_by_hand():
    # Identity router on 2-d tokens: the logits are the tokens themselves.
    tokens = [[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [3.0, 0.0]]
    gate = _gate(MoEConfig(num_experts=2, top_k=1, routing="token", noise_policy="none"), [[1.0, 0.0], [0.0, 1.0]])
    log = RouterLog()
    gate.log = log
    padded = [*tokens, [0.0, 9.0]]  # a padded fifth token counts nowhere
    gate.decide(Routing(("text_input",), padding=torch.tensor([[False] * 4 + [True]])), torch.tensor([padded]))
    stats = log.stats()

    def softmax(row):
        exps = [math.exp(v) for v in row]
        return [e / sum(exps) for e in exps]

    f = [3 / 4, 1 / 4]  # first choices: experts 0, 1, 0, 0
    p = [sum(softmax(t)[e] for t in tokens) / 4 for e in range(2)]
    balance = 2 * (f[0] * p[0] + f[1] * p[1])
    z = sum(math.log(sum(math.exp(v) for v in t)) ** 2 for t in tokens) / 4
    assert stats.balance_loss.item() == pytest.approx(balance, rel=1e-6)
    assert stats.z_loss.item() == pytest.approx(z, rel=1e-6)
    assert stats.load.tolist() == pytest.approx(f) and stats.dropped_fraction.item() == 0
    # A perfectly balanced router scores 1.
    even, _ = router_losses(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), None)
    assert even.item() == pytest.approx(1.0)


def test_forced_overflow_drops_what_exceeds_the_capacity():
    config = MoEConfig(num_experts=2, top_k=1, routing="token", noise_policy="none", capacity_factor=0.25)
    gate = _gate(config, [[0.0] * 4, [-1.0] * 4])  # every token of positive features picks expert 0
    log = RouterLog()
    gate.log = log
    x = torch.rand(1, 8, 4) + 0.1
    plan = gate.decide(Routing(("text_input",)), x)
    assert plan.capacity == 1  # ceil(0.25 * 1 * 8 / 2)
    assert plan.kept.tolist() == [[True] + [False] * 7]  # the first token wins the one place
    stats = log.stats()
    assert stats.dropped_fraction.item() == pytest.approx(7 / 8) and stats.load.tolist() == [1.0, 0.0]
    layer = ExpertLinear(4, 3, num_experts=2)
    torch.nn.init.normal_(layer.bias)
    out = layer(x, plan)
    assert torch.equal(out[0, 1:], torch.zeros(7, 3))  # a dropped token's expert output is zero, bias included
    torch.testing.assert_close(out[0, 0], plan.weights[0, 0] * F.linear(x[0, 0], layer.weight[0], layer.bias[0]))
    # Second choices queue behind every first choice: with capacity 2, tokens 0 and 2 fill expert 0 first, so
    # token 1's second choice (expert 0) is dropped, and token 2's (expert 1) finds tokens 1 and 0 there.
    ids, gates = torch.tensor([[0, 1], [1, 0], [0, 1]]), torch.full((3, 2), 0.5)
    assert plan_dispatch(ids, gates, None, 2, 2).kept.tolist() == [[True, True, True], [True, False, False]]


def test_dropless_dispatch_with_fixed_choices_equals_the_dense_computation_by_hand():
    torch.manual_seed(0)
    layer = ExpertLinear(5, 3, num_experts=3)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 3, 5)
    ids = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [1, 2], [2, 0]])
    gates = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [1.0, 0.0]])
    plan = plan_dispatch(ids, gates, None, num_experts=3, capacity=6)  # dropless: C = T
    out = layer(x, plan)
    tokens = x.flatten(0, 1)
    for t in range(6):
        expected = sum(g * (layer.weight[e] @ tokens[t] + layer.bias[e])
                       for e, g in zip(ids[t].tolist(), gates[t].tolist(), strict=True))
        torch.testing.assert_close(out.flatten(0, 1)[t], expected)


@pytest.mark.parametrize("routing", ["token", "context"])
def test_identical_experts_compute_the_dense_model(routing):
    """Dropless top-2 gates sum to 1: a model whose experts all copy a dense model's linears is that model."""
    dense = up.create_model("tiny", image_size=32).eval()
    moe = _model(routing).eval()
    state = moe.state_dict()
    for key, value in dense.state_dict().items():
        state[key] = value.expand_as(state[key]) if state[key].dim() > value.dim() else value
    moe.load_state_dict(state)
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2, 5))
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        torch.testing.assert_close(moe.encode_image(images), dense.encode_image(images), **CLOSE)
        torch.testing.assert_close(moe.encode_text(ids, padding), dense.encode_text(ids, padding), **CLOSE)


@pytest.mark.parametrize("routing", ["modality", "task", "token", "context"])
def test_gradients_reach_the_gates(routing):
    model = _model(routing, capacity_factor=1.0 if routing == "token" else None).train()
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2, 5))
    with model.routing_task("shape"), model.router_log() as log:
        logits = model.retrieval_logits(images, ids)
    loss = F.cross_entropy(logits, torch.arange(2))
    stats = log.stats()
    assert (stats is not None) == (routing in ("token", "context"))
    if stats is not None:
        loss = loss + stats.balance_loss + stats.z_loss
    loss.backward()
    for i in (0, 2):
        for gate in (model.blocks[i].attn.gate, model.blocks[i].mlp.gate):
            grads = [p.grad for p in gate.parameters()]
            assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    if stats is not None:  # the router losses alone train the routers too
        model.zero_grad()
        with model.router_log() as log:
            model.encode_image(images)
        (log.stats().balance_loss + log.stats().z_loss).backward()
        assert model.blocks[0].mlp.gate.router.weight.grad.abs().sum() > 0


def test_token_routing_decodes_alike_with_and_without_the_cache():
    model = _model("token").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        vocabulary, token_ids = model.caption_targets(torch.arange(40))
        cached, plain = (beam_search(model, images, beam_size=2, max_len=4, vocabulary=vocabulary,
                                     token_ids=token_ids, use_cache=use) for use in (True, False))
    assert torch.equal(cached.tokens, plain.tokens)
    torch.testing.assert_close(cached.scores, plain.scores, **CLOSE)


def test_context_routing_decodes_without_the_cache():
    model = _model("context").eval()
    assert not model.decodes_with_cache and _model("token").decodes_with_cache
    images = torch.randn(1, 3, 32, 32)
    vocabulary, token_ids = model.caption_targets(torch.arange(30))
    with pytest.raises(ValueError, match="^context routing cannot decode with the key/value cache"):
        beam_search(model, images, beam_size=1, max_len=2, vocabulary=vocabulary, token_ids=token_ids)
    model.caption_vocabulary = torch.arange(30)
    assert len(model.caption(images, beam_size=1, max_len=2)) == 1


def test_task_routing_serves_only_its_tasks():
    model = _model("task").eval()
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"^task routing needs the call's task, one of the routed tasks "
                                         r"\(shape, caption\): pass --routing-task NAME \(Python: run the calls "
                                         r"inside model.routing_task\(name\)\)$"):
        model.encode_image(images)
    refusal = r"^task routing cannot serve task 'colour': its experts are routed only for the training tasks shape, "
    with pytest.raises(ValueError, match=refusal + "caption$"), model.routing_task("colour"):
        pass
    with torch.no_grad(), model.routing_task("shape"):
        shape = model.encode_image(images)
    with torch.no_grad(), model.routing_task("caption"):
        assert not torch.allclose(model.encode_image(images), shape)
    with pytest.raises(ValueError, match=r"^moe.routing 'task' needs moe.tasks"):
        up.create_model("tiny-moe", moe={"routing": "task"})


@pytest.mark.parametrize(("moe", "message"), [
    ({"routing": "expert"}, "moe.routing must be one of 'attribute', 'modality', 'task', 'token', 'context', "
                            "got 'expert'"),
    ({"routing": "token", "capacity_factor": 0}, r"capacity_factor must be a finite number in \(0.0, 4096\], got 0"),
    ({"routing": "task", "tasks": ["a", "a"]}, r"moe.tasks must be a list of distinct task names, got \['a', 'a'\]"),
    ({"tasks": ["a"]}, "moe.tasks names the tasks of routing 'task', and moe.routing is 'attribute'"),
    ({"routing": "context", "folded": True}, "moe.routing 'context' routes by token features: its experts cannot "
                                             "be folded"),
])
def test_config_refusals_are_one_line(moe, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        up.get_config("tiny-moe", moe=moe)


@pytest.mark.parametrize("routing", ["token", "context"])
def test_folding_refuses_token_features(routing):
    model = _model(routing)
    message = f"^moe.routing '{routing}' routes by token features: its experts cannot be folded$"
    with pytest.raises(ValueError, match=message):
        fold_experts(model)
    with pytest.raises(ValueError, match=message):
        dense_view(model, "visual_input")


@pytest.mark.parametrize("routing", ["modality", "task"])
def test_folded_models_compute_the_unfolded_ones(routing):
    model = _model(routing).eval()
    folded = fold_experts(model)
    keys = {"modality": len(ATTRIBUTES), "task": 2}[routing]  # the attribute rows, or the tasks
    assert all(g.ids.shape[0] == keys for g in folded.modules() if isinstance(g, FoldedGate))
    assert folded.blocks[0].mlp.fc1.weight.shape[0] == 2  # merged linears: per modality, or per task
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2, 5))

    def outputs(m: up.UniPerceiver) -> tuple[torch.Tensor, ...]:
        targets = m.vocabulary_targets(torch.arange(20))
        return m.encode_image(images), m.encode_text(ids), m.caption_logits(images, ids, None, targets)

    for task in ("shape", "caption"):
        with torch.no_grad(), model.routing_task(task), folded.routing_task(task):
            for a, b in zip(outputs(folded), outputs(model), strict=True):
                torch.testing.assert_close(a, b, **CLOSE)
    if routing == "modality":
        dense = dense_view(model, "visual_input")
        with torch.no_grad():
            torch.testing.assert_close(dense.encode_image(images), model.encode_image(images), **CLOSE)
    else:
        with pytest.raises(ValueError, match="^moe.routing 'task' routes by task, not by attribute row"):
            dense_view(model, "visual_input")


# ---------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def toyworld(tmp_path_factory):
    root = tmp_path_factory.mktemp("toyworld")
    generate(root, size="tiny", image_size=32, num_frames=4, min_shards=2, progress=False)
    return root


def _recipe(root, routing: str) -> dict:
    tasks = [
        {"name": "shape", "type": "image_classification", "data": "images/train", "label_set": "shape",
         "batch_size": 8, "augment": False},
        {"name": "caption", "type": "image_caption", "data": "images/train", "batch_size": 4,
         "vocabulary": "corpus", "augment": False},
        {"name": "mlm", "type": "text_mlm", "data": "text/train", "batch_size": 4, "max_text_len": 32,
         "vocabulary": "sampled", "negatives": 32},
    ]
    evaluation = [
        {"name": "shape", "type": "image_classification", "data": "images/test", "label_set": "shape",
         "max_samples": 8, "batch_size": 8},
        {"name": "colour", "type": "image_classification", "data": "images/test", "label_set": "colour",
         "max_samples": 8, "batch_size": 8},  # never trained: task routing has no experts for it
    ]
    if routing == "context":  # decoding without the cache (METEOR's start-up takes seconds: this level only)
        evaluation.append({"name": "caption", "type": "image_caption", "data": "images/test", "max_samples": 2,
                           "batch_size": 2, "beam_size": 1, "max_len": 3})
    moe = {"routing": routing, **({"capacity_factor": 1.25} if routing == "token" else {})}
    return {"name": f"routing-{routing}", "stage": "pretrain", "data_root": str(root), "tasks": tasks,
            "model": {"preset": "tiny-moe", "overrides": {"image_size": 32, "layers": 2, "max_frames": 4,
                                                          "moe": moe}},
            "train": {"steps": 4, "lr": 1e-3, "log_every": 2, "grad_clip": 1.0, "seed": 1},
            "evaluation": {"tasks": evaluation}}


@pytest.mark.parametrize("routing", LEVELS)
def test_every_routing_level_trains_and_evaluates(toyworld, tmp_path, routing):
    run = tmp_path / "run"
    final = train(validate(_recipe(toyworld, routing)), run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [v for r in records for k, v in r.items() if k.endswith("/loss")]
    assert losses and all(v is not None and math.isfinite(v) for v in losses)
    routed = routing in ("token", "context")
    moe_keys = {"moe/balance_loss", "moe/z_loss", "moe/dropped_fraction", *(f"moe/load_e{i}" for i in range(4))}
    for record in records:
        assert moe_keys <= record.keys() if routed else not any(k.startswith("moe/") for k in record)
    if routed:
        assert all(math.isfinite(r[k]) for r in records for k in moe_keys)
    summary = json.loads((run / "eval" / "final" / "summary.json").read_text())
    assert {"shape", *(["caption"] if routing == "context" else [])} <= summary["results"].keys()
    assert (run / "eval" / "final" / "shape" / "results.json").exists()
    config = json.loads((final / "config.json").read_text())["model"]["moe"]
    assert config["routing"] == routing
    if routing == "task":  # the recorded tasks route the bundle; an unseen task is refused in one line
        assert config["tasks"] == ["shape", "caption", "mlm"]
        assert summary["errors"] == {"colour": "task routing cannot serve task 'colour': its experts are routed "
                                               "only for the training tasks shape, caption, mlm"}
        model = up.load_model(final)
        spec = validate(_recipe(toyworld, routing)).evaluation.tasks[1]
        with pytest.raises(ValueError, match="^task routing cannot serve task 'colour'"):
            evaluate_task(model, spec, toyworld)
    else:
        assert "colour" in summary["results"] and "errors" not in summary


def test_task_routing_trains_only_the_tasks_it_lists(toyworld):
    data = _recipe(toyworld, "task")
    data["model"]["overrides"]["moe"]["tasks"] = ["shape", "caption"]
    with pytest.raises(ValueError, match=r"^recipe: model: moe.tasks \(shape, caption\) lacks the training task\(s\) "
                                         r"mlm"):  # refused by validation, before a model is built
        validate(data)
