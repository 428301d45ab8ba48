"""Retrieval with gathered negatives (``gather_negatives``): on 2 gloo processes each holding half of a global
batch, each process's image-to-text and text-to-image logits are the rows of one process's logits at the global
batch (its own pairs' columns first), and so are the losses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.parallel.test_targets import _port
from uniperceiver_cli.model.config import get_config
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.train.losses import retrieval_loss
from uniperceiver_cli.train.recipe import validate
from uniperceiver_cli.train.tasks import TrainTask

# Tests that start several processes run one after another on one xdist worker (Makefile: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("processes")

REPO = Path(__file__).resolve().parents[2]
WORLD, PER = 2, 3


def _model() -> UniPerceiver:
    torch.manual_seed(0)
    return UniPerceiver(get_config("tiny", image_size=32, drop_path=0.0)).double().eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch: WORLD * PER images and their captions (token ids ending in <|endoftext|>)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(WORLD * PER, 3, 32, 32, generator=g, dtype=torch.float64)
    texts = torch.cat([torch.randint(300, 4000, (WORLD * PER, 5), generator=g),
                       torch.full((WORLD * PER, 1), 49407)], dim=1)
    return images, texts


def rank_main(out: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    model, (images, texts) = _model(), _batch()
    mine = slice(rank * PER, (rank + 1) * PER)
    task = TrainTask(None, None, "", None, negatives=(rank, WORLD))  # only its negatives matter here
    with torch.no_grad():
        query, text = model.retrieval_features(images[mine], texts[mine])
        i2t, t2i = task.retrieval_logits(model, query, text)
    torch.save({"i2t": i2t, "t2i": t2i, "loss": retrieval_loss(i2t, 0.1, t2i)}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_two_processes_gather_the_global_batchs_negatives(tmp_path: Path):
    out, port = tmp_path / "logits", _port()
    code = "import sys; from tests.parallel.test_negatives import rank_main; rank_main(sys.argv[1])"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_"))}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO,
                              env={**env, "RANK": str(r), "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    for p in procs:
        output, _ = p.communicate(timeout=240)
        assert p.returncode == 0, output[-3000:]
    model, (images, texts) = _model(), _batch()
    with torch.no_grad():
        logits = model.retrieval_logits(images, texts)  # one process, the global batch: (6, 6)
    losses = []
    for rank in range(WORLD):
        part = torch.load(f"{out}.{rank}")
        rows = list(range(rank * PER, (rank + 1) * PER))
        columns = rows + [c for c in range(WORLD * PER) if c not in rows]  # its own pairs first
        torch.testing.assert_close(part["i2t"], logits[rows][:, columns], rtol=0, atol=1e-12)
        torch.testing.assert_close(part["t2i"], logits.t()[rows][:, columns], rtol=0, atol=1e-12)
        losses.append(part["loss"])
    assert float(sum(losses) / WORLD) == pytest.approx(float(retrieval_loss(logits, 0.1)), abs=1e-12)


def test_gathered_negatives_are_a_retrieval_key_on_as_the_reference(tmp_path: Path):
    task = {"name": "t", "type": "image_caption", "data": "x", "gather_negatives": True}
    with pytest.raises(ValueError, match="gathers retrieval negatives; image_caption is not a retrieval task"):
        validate({"name": "r", "stage": "pretrain", "tasks": [task]})
    from uniperceiver_cli.train.catalogue import load_checked

    assert load_checked("base-finetune-coco-retrieval").tasks[0].gather_negatives
    assert not load_checked("base-finetune-flickr30k-retrieval").tasks[0].gather_negatives
