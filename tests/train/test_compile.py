"""train.compile: each encoder block compiles whole (fullgraph) on the visual and text paths, a ToyWorld task mix
compiles without graph breaks within the recompile limit, and its losses are eager's within float tolerance."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import uniperceiver_cli.model.uniperceiver as uniperceiver
from uniperceiver_cli.data.loader import _bucketed
from uniperceiver_cli.model.config import get_config
from uniperceiver_cli.model.uniperceiver import RECOMPILE_LIMIT, TEXT_TARGET, VISUAL, UniPerceiver
from uniperceiver_cli.train.loop import train
from uniperceiver_cli.train.recipe import validate

TASKS = [
    {"name": "shape", "type": "image_classification", "data": "images/train", "label_set": "shape",
     "batch_size": 8, "augment": False},
    {"name": "caption", "type": "image_caption", "data": "images/train", "batch_size": 4, "vocabulary": "corpus",
     "augment": False},
    {"name": "retrieval", "type": "image_retrieval", "data": "images/train", "batch_size": 8, "augment": False},
    {"name": "mlm", "type": "text_mlm", "data": "text/train", "batch_size": 4, "max_text_len": 32,
     "vocabulary": "sampled", "negatives": 64},
    {"name": "motion", "type": "video_classification", "data": "videos/train", "label_set": "motion",
     "batch_size": 4, "num_frames": 2, "frame_stride": 3.75, "augment": False},
]


@pytest.mark.parametrize(("preset", "moe"), [("tiny", None), ("tiny-moe", {}),
                                            ("tiny-moe", {"routing": "token", "capacity_factor": 1.25})])
def test_a_block_compiles_whole_on_the_visual_and_text_paths(preset: str, moe: dict | None) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = UniPerceiver(get_config(preset, image_size=32, **({"moe": moe} if moe is not None else {}))).eval()
    block = model.blocks[0]  # an expert block in tiny-moe (token routing with a capacity: no host read)
    visual = model.visual_prefix(torch.randn(2, 1, 3, 32, 32))
    ids, padding = torch.randint(0, 1000, (2, 7)), torch.zeros(2, 8, dtype=torch.bool)
    padding[0, -3:] = True
    text = torch.cat([model.spe(2), model.embed_text(ids)], dim=1)
    def routed(routing, padding):  # noqa: ANN001, ANN202 - MoE layers read the padding from the routing
        return dataclasses.replace(routing, padding=padding) if model.config.moe is not None else routing

    calls = [(visual, None, routed(VISUAL, None)), (text, ~padding[:, None, None, :], routed(TEXT_TARGET, padding))]
    compiled = torch.compile(block, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    for x, mask, routing in calls:
        expected = block(x, mask, routing)[0]
        torch.testing.assert_close(compiled(x, mask, routing)[0], expected, rtol=0, atol=0)


def test_texts_are_padded_to_a_multiple_of_8_within_the_limit() -> None:
    ids, padding = torch.ones(2, 11, dtype=torch.long), torch.zeros(2, 11, dtype=torch.bool)
    bucketed, pad = _bucketed(ids, padding, 8, 30)
    assert bucketed.shape == (2, 16) and torch.equal(bucketed[:, :11], ids) and not bucketed[:, 11:].any()
    assert not pad[:, :11].any() and pad[:, 11:].all()
    assert _bucketed(ids, padding, 8, 12)[0].shape == (2, 12)  # not past max_text_len
    assert _bucketed(ids[:, :8], padding[:, :8], 8, 30)[0].shape == (2, 8)


def _losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_compiled_task_mix_has_no_graph_break_and_eager_losses(toyworld_32: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    preset = "tiny-moe"  # expert blocks (0, 2) and a dense one (1)
    monkeypatch.setattr(uniperceiver, "COMPILE_BACKEND", "aot_eager")  # the graphs inductor gets, run eagerly
    def recipe(compile: bool):  # noqa: ANN202
        return validate({"name": "t", "stage": "pretrain", "data_root": str(toyworld_32), "tasks": TASKS,
                         "model": {"preset": preset, "overrides": {"image_size": 32, "max_frames": 2}},
                         "train": {"steps": 20, "lr": 1e-3, "warmup_steps": 2, "log_every": 1, "grad_clip": 1.0,
                                   "compile": compile}})
    eager = train(recipe(False), tmp_path / "eager")
    torch._dynamo.reset()
    counters.clear()
    compiled = train(recipe(True), tmp_path / "compiled")
    assert not counters["graph_break"]
    frames = counters["frames"]
    assert frames["total"] == frames["ok"] <= RECOMPILE_LIMIT  # every graph compiled; one per kind of call
    tasks = set()
    for a, b in zip(_losses(eager.parent), _losses(compiled.parent), strict=True):
        for key in a:
            if key.endswith("/loss"):
                tasks.add(key)
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    assert len(tasks) == len(TASKS)


def test_tf32_is_set_for_the_run_and_restored() -> None:
    from uniperceiver_cli.train.loop import _tf32

    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    with _tf32(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"  # readable: what torch.compile reads
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before
    with _tf32(False):
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before
