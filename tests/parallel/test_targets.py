"""A target set split across 2 gloo processes (:class:`TargetSplit`) gives the loss and gradients of encoding the
whole set on one process, for a dense and an attribute-routed MoE model, for the vocabulary's target rows and
for class names (ids with padding)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uniperceiver_cli.model.config import get_config
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.parallel.targets import TargetSplit

# Tests that start several processes run one after another on one xdist worker (Makefile: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("processes")

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
# No gate noise: it is drawn per call, so splitting would draw other noise (equal in distribution only).
MODELS = {"dense": ("tiny", {}),
          "attribute-moe": ("tiny-moe", {"moe": {"routing": "attribute", "noise_policy": "none"}})}
IDS = torch.arange(300, 345)  # 45 rows: the last process's slice is padded


def _model(model: str) -> UniPerceiver:
    preset, overrides = MODELS[model]
    torch.manual_seed(0)
    # float64: the <|spe|> row's gradient sums many terms that nearly cancel, and float32 round-off in another
    # summation order shows there as 1e-3 of its size (2e-5 absolute); in float64 the two must agree to 1e-6.
    return UniPerceiver(get_config(preset, image_size=32, layers=2, **overrides)).double().train()


def _loss(model: UniPerceiver, rank: int, split: TargetSplit | None) -> torch.Tensor:
    """Process ``rank``'s loss: its own queries scored against the vocabulary rows and the class names."""
    queries = torch.randn(4, model.config.width, generator=torch.Generator().manual_seed(100 + rank),
                          dtype=torch.float64)
    vocabulary = model.vocabulary_targets(IDS) if split is None else split.encode(model.vocabulary_targets, IDS)
    ids = torch.tensor([[320, 49407, 0], [330, 331, 49407], [340, 49407, 0]])  # three class names
    padding = torch.tensor([[False, False, True], [False, False, False], [False, False, True]])
    classes = model.encode_text(ids, padding) if split is None else split.encode(model.encode_text, ids, padding)
    labels = torch.tensor([rank, 5 + rank, 2, 40])
    return torch.nn.functional.cross_entropy(queries @ vocabulary.T * 10, labels) \
        + torch.nn.functional.cross_entropy(queries @ classes.T * 10, labels % 3)


def rank_main(model: str, out: str) -> None:
    """One process (``python -c``): the split loss, the gradients averaged over the processes as DeepSpeed does."""
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    net = _model(model)
    loss = _loss(net, rank, TargetSplit(rank, WORLD, min_rows=2))
    loss.backward()
    grads = {}
    for name, p in net.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.distributed.all_reduce(grad)
        grads[name] = grad / WORLD
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total / WORLD, "grads": grads}, out)
    torch.distributed.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("model", MODELS)
def test_a_split_target_set_gives_the_loss_and_gradients_of_the_whole_set(tmp_path: Path, model: str):
    out = tmp_path / "split.pt"
    port = _port()
    code = "import sys; from tests.parallel.test_targets import rank_main; rank_main(*sys.argv[1:])"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_"))}
    procs = [subprocess.Popen([sys.executable, "-c", code, model, str(out)], cwd=REPO,
                              env={**env, "RANK": str(r), "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    for p in procs:
        output, _ = p.communicate(timeout=240)
        assert p.returncode == 0, output[-3000:]
    split = torch.load(out)

    net = _model(model)  # one process, the whole set, both processes' losses
    losses = [_loss(net, rank, None) for rank in range(WORLD)]
    (sum(losses) / WORLD).backward()
    assert float(split["loss"]) == pytest.approx(float(sum(losses).detach() / WORLD), abs=1e-6)
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in net.named_parameters()}
    assert grads.keys() == split["grads"].keys()
    worst = max((grads[n] - split["grads"][n]).abs().max().item() for n in grads)
    assert worst < 1e-6, worst
    assert max(g.abs().max().item() for n, g in grads.items() if "word" in n) > 1e-3  # the targets did train


def test_small_sets_and_one_process_are_not_split():
    calls = []

    def encode(rows: torch.Tensor) -> torch.Tensor:
        calls.append(len(rows))
        return rows.float()[:, None]

    assert torch.equal(TargetSplit(0, 1, 2).encode(encode, IDS), IDS.float()[:, None])
    assert torch.equal(TargetSplit(1, 4, 100).encode(encode, IDS), IDS.float()[:, None])
    assert calls == [45, 45]
