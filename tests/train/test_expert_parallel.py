"""Expert parallelism under DeepSpeed: two gloo processes holding half of the experts each train exactly like one
process holding all of them; checkpoints hold each process's experts, resume exactly and export to one bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.helpers import random_png
from tests.train.test_deepspeed import _launch, _metrics, _unshuffled
from tests.train.test_deepspeed import data_root as data_root  # noqa: F401 - the shared fixture
from uniperceiver_cli.checkpoints.loading import load_model
from uniperceiver_cli.checkpoints.runs import EXPERTS_DIR
from uniperceiver_cli.checkpoints.sources import find_source
from uniperceiver_cli.cli.app import app
from uniperceiver_cli.data.shards import Manifest, Sample, write_shards
from uniperceiver_cli.export import export
from uniperceiver_cli.train import loop
from uniperceiver_cli.train.recipe import validate

# Tests that start several processes run one after another on one xdist worker (Makefile: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("processes")

pytest.importorskip("deepspeed")

B, STEPS, ATOL = 2, 4, 1e-5


def _recipe(root: Path, *, batch_size: int, kind: str, expert_parallel: int = 1, zero: int = 0,
            accumulation: int = 1, checkpoint_every: int = 0, routing: str = "attribute") -> dict:
    return {
        "name": "ep", "stage": "pretrain", "data_root": str(root),
        "tasks": [{"name": "cls", "type": "image_classification", "data": "split", "batch_size": batch_size,
                   "augment": False}],
        # 4 experts, top-2: with 2 processes a segment's two experts sit on one process or on both. No gate noise
        # and one temporal row (an image takes a random one in training), so the single process and the group
        # draw nothing differently.
        "model": {"preset": "tiny-moe", "overrides": {"image_size": 32, "layer_scale_init": 1.0, "max_frames": 1,
                                                       "moe": {"noise_policy": "none", "routing": routing}}},
        # The balance loss is taken over each process's own tokens (as Switch and DeepSpeed do), which is not the
        # loss over the global batch: off here, so one process and two compute the same thing.
        "train": {"steps": STEPS, "lr": 2e-3, "warmup_steps": 0, "grad_clip": 0.1, "accumulation": accumulation,
                  "precision": "fp32", "log_every": 1, "checkpoint_every": checkpoint_every, "seed": 3,
                  "moe_balance_weight": 0.0, "split_targets": 2},  # the 3 class names: split
        "engine": {"kind": kind, "zero_stage": zero, "expert_parallel": expert_parallel},
    }


def _single(root: Path, out: Path, routing: str = "attribute", processes: int = 2) -> Path:
    """One process with every expert, batch ``processes`` x B, accumulation 2."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "make_loader", _unshuffled(loop.make_loader))
        recipe = _recipe(root, batch_size=processes * B, kind="single", accumulation=2, routing=routing)
        loop.train(validate(recipe), out)
    return out


@pytest.fixture(scope="module")
def single(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    return _single(data_root, tmp_path_factory.mktemp("ep-single"))


def _assert_same(single: Path, parallel: Path, norm_rel: float = 1e-5) -> None:
    a, b = _metrics(single), _metrics(parallel)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b, strict=True):
        assert rb["cls/loss"] == pytest.approx(ra["cls/loss"], abs=ATOL), ra["step"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=norm_rel, abs=ATOL), ra["step"]
    wa, wb = load_file(single / "final" / "model.safetensors"), load_file(parallel / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < ATOL
    experts = [k for k in wa if wa[k].dim() == 3]  # (experts, out, in): every one trained
    assert experts and all(wa[k].shape[0] == 4 for k in experts)


@pytest.mark.parametrize("zero", [0, 2], ids=["zero0", "zero2"])
def test_two_processes_holding_half_the_experts_equal_one(data_root: Path, tmp_path: Path, single: Path,  # noqa: F811
                                                          zero: int):
    recipe = _recipe(data_root, batch_size=B, kind="deepspeed", expert_parallel=2, zero=zero, accumulation=2,
                     checkpoint_every=2)
    run = tmp_path / "ep"
    if zero == 2:  # killed after step 2, resumed: the same end
        _launch(recipe, run, launcher="torchrun", stop_after=2)
        _launch(recipe, run, launcher="torchrun", resume="auto")
    else:
        _launch(recipe, run, launcher="torchrun")
    _assert_same(single, run)
    step = run / "checkpoints" / f"step-{STEPS:07d}"
    shards = {p.name: load_file(p) for p in sorted((step / EXPERTS_DIR).iterdir())}
    assert list(shards) == ["rank-000-of-002.safetensors", "rank-001-of-002.safetensors"]
    assert all(t.shape[0] == 2 for shard in shards.values() for t in shard.values())  # each holds its 2 experts

    # export stacks the shards into one bundle equal to the run's final model
    source = find_source(step)
    assert "experts over 2 ranks, stacked" in source.describe()
    done = export(source, tmp_path / "bundle")
    final, exported = load_file(run / "final" / "model.safetensors"), load_file(done.out / "model.safetensors")
    assert final.keys() == exported.keys() and all(torch.equal(final[k], exported[k]) for k in final)
    assert torch.equal(load_model(step).state_dict()["blocks.1.mlp.fc1.weight"], final["blocks.1.mlp.fc1.weight"])

    # and evaluates to the same metrics as the run's final model
    results = []
    for model in (run / "final", done.out):
        out = tmp_path / f"eval-{model.name}"
        result = CliRunner().invoke(app, ["evaluate", "--model", str(model), "--data", str(data_root / "split"),
                                          "--task", "image_classification", "--out", str(out)])
        assert result.exit_code == 0, result.output
        results.append(json.loads((out / "results.json").read_text())["metrics"])
    assert results[0] == results[1]


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ep4")
    manifest = Manifest(dataset="ep", split="train", modality="image", tasks=["image_classification"],
                        source="test", classes=["red", "green", "blue"])
    samples = [Sample(f"s{i}", image=random_png(i), image_ext="png", label=i % 3) for i in range(4 * B)]
    written = write_shards(root / "split", samples, lambda s: s, manifest=manifest, min_shards=4, progress=False)
    assert [s.samples for s in written.shards] == [B] * 4
    return root


def test_expert_and_data_parallel_four_processes_equal_one(four_shards: Path, tmp_path: Path):
    """4 processes at expert_parallel 2: two expert-parallel groups, and each pair of processes holding the same
    experts is an expert-data-parallel group (the gradients of its experts averaged over it, its shard written
    once). ZeRO 2, killed after step 2 and resumed."""
    single = _single(four_shards, tmp_path / "single", processes=4)
    recipe = _recipe(four_shards, batch_size=B, kind="deepspeed", expert_parallel=2, zero=2, accumulation=2,
                     checkpoint_every=2)
    run = tmp_path / "ep"
    _launch(recipe, run, launcher="torchrun", stop_after=2, processes=4, timeout=400)
    _launch(recipe, run, launcher="torchrun", resume="auto", processes=4, timeout=400)
    _assert_same(single, run, norm_rel=1e-4)  # four-way reductions: norms agree to ~2e-5, the weights to 2e-6
    step = run / "checkpoints" / f"step-{STEPS:07d}" / EXPERTS_DIR
    assert sorted(p.name for p in step.iterdir()) == ["rank-000-of-002.safetensors", "rank-001-of-002.safetensors"]


def test_a_checkpoint_resumes_only_with_its_expert_parallelism(tmp_path: Path):
    from types import SimpleNamespace

    from uniperceiver_cli.parallel.experts import ExpertShard
    from uniperceiver_cli.train.engines.deepspeed import DeepSpeedEngine

    folder = tmp_path / EXPERTS_DIR
    folder.mkdir()
    (folder / "rank-000-of-002.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="written with engine.expert_parallel > 1; resume with the same setting"):
        DeepSpeedEngine._check_expert_layout(SimpleNamespace(shard=None), folder)
    four = SimpleNamespace(shard=ExpertShard(1, 1, None, 0, 4), expert_parallel=4)
    with pytest.raises(FileNotFoundError, match=r"rank-001-of-004.safetensors is missing: the checkpoint holds "
                                                r"rank-000-of-002.safetensors; resume with the engine.expert_parallel"):
        DeepSpeedEngine._check_expert_layout(four, folder)


def test_token_routing_dropless_two_processes_equal_one(data_root: Path, tmp_path: Path):  # noqa: F811
    """Each process routes its own tokens; DeepSpeed's all-to-all takes them to their experts' owners and back."""
    single = _single(data_root, tmp_path / "single", routing="token")
    recipe = _recipe(data_root, batch_size=B, kind="deepspeed", expert_parallel=2, accumulation=2, routing="token")
    # Whole class-name sets: split, the experts would multiply other groups of tokens (round-off beyond ATOL here).
    recipe["train"]["split_targets"] = 0
    _launch(recipe, tmp_path / "ep", launcher="torchrun")
    _assert_same(single, tmp_path / "ep")
    record = _metrics(tmp_path / "ep")[-1]
    assert record["moe/dropped_fraction"] == 0 and sum(record[f"moe/load_e{i}"] for i in range(4)) == \
        pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("routing", ["modality", "task", "context"])
def test_every_routing_level_trains_expert_parallel(data_root: Path, tmp_path: Path, routing: str):  # noqa: F811
    recipe = _recipe(data_root, batch_size=B, kind="deepspeed", expert_parallel=2, checkpoint_every=2,
                     routing=routing)
    recipe["train"]["steps"] = 2
    recipe["evaluation"] = {"tasks": [{"name": "cls", "type": "image_classification", "data": "split"}]}
    _launch(recipe, tmp_path / "ep", launcher="torchrun")
    losses = [r["cls/loss"] for r in _metrics(tmp_path / "ep")]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    summary = json.loads((tmp_path / "ep" / "eval" / "final" / "summary.json").read_text())
    assert "cls" in summary["results"] and not summary.get("errors")
    assert load_model(tmp_path / "ep" / "final").config.moe.routing == routing
    # a checkpoint of the run loads as well (task routing: its routed tasks come from the run's recipe)
    step = tmp_path / "ep" / "checkpoints" / f"step-{2:07d}"
    done = export(find_source(step), tmp_path / "bundle")
    assert load_model(done.out).config.moe.tasks == (["cls"] if routing == "task" else [])


def test_a_missing_expert_shard_is_one_line(data_root: Path, tmp_path: Path):  # noqa: F811
    recipe = _recipe(data_root, batch_size=B, kind="deepspeed", expert_parallel=2, checkpoint_every=2)
    recipe["train"]["steps"] = 2
    run = tmp_path / "ep"
    _launch(recipe, run, launcher="torchrun")
    step = run / "checkpoints" / f"step-{2:07d}"
    (step / EXPERTS_DIR / "rank-001-of-002.safetensors").unlink()
    result = CliRunner().invoke(app, ["export", str(step), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "experts of rank(s) 1 are missing" in result.stderr and not (tmp_path / "out").exists()


def test_expert_parallel_settings_are_checked(data_root: Path):  # noqa: F811
    from uniperceiver_cli.train.recipe import RecipeError

    with pytest.raises(RecipeError, match="expert parallelism .2. runs under DeepSpeed"):
        validate(_recipe(data_root, batch_size=B, kind="single", expert_parallel=2))
