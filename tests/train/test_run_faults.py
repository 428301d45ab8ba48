"""A training run that meets a fault (a failed write, a recipe or override that does not fit, unreadable data, a
DeepSpeed JSON naming paths elsewhere) stops in one line and leaves the run directory as it was."""

from __future__ import annotations

import json
import resource
import signal
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.helpers import image_split
from uniperceiver_cli.checkpoints.errors import CheckpointError
from uniperceiver_cli.checkpoints.runs import STATE_FILE
from uniperceiver_cli.cli.app import app
from uniperceiver_cli.train import loop
from uniperceiver_cli.train.engines.deepspeed import deepspeed_config
from uniperceiver_cli.train.recipe import validate


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A readable split of 8 images in 2 shards, and a split whose 2 shards are not tars."""
    root = tmp_path_factory.mktemp("faults")
    image_split(root / "split", 8)
    image_split(root / "broken", 8)
    for tar in (root / "broken").glob("*.tar"):
        tar.write_bytes(b"not a tar at all" * 100)
        tar.with_suffix(".json").unlink()
    return root


def _data(root: Path, data: str = "split", **train) -> dict:
    return {"name": "faults", "stage": "pretrain", "data_root": str(root),
            "tasks": [{"name": "cls", "type": "image_classification", "data": data, "batch_size": 4,
                       "augment": False}],
            "model": {"preset": "tiny", "overrides": {"image_size": 32, "layers": 1}},
            "train": {"steps": 4, "log_every": 1, "checkpoint_every": 2, **train}}


def _write_recipe(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _pretrain(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["pretrain", *args])
    return result.exit_code, " ".join(result.output.split())


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_last_checkpoint(data_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    loop.train(validate(_data(data_root)), run, stop_after=2)
    folder = run / "checkpoints" / "step-0000002"
    written = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the kernel's default for the limit is to kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, limit[1]))  # below a checkpoint's size
    try:
        code, out = _pretrain("--recipe", str(_write_recipe(tmp_path, _data(data_root))), "--run-dir", str(run),
                              "--resume", "auto")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert code == 2, out
    assert "error: cannot write" in out and "step-0000004: [Errno 27] File too large" in out, out
    assert "The last good checkpoint is" in out and "Traceback" not in out
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]  # no partial folder left
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == written
    assert loop.train(validate(_data(data_root)), run, resume="auto") == run / "final"  # the run goes on from it


def test_resume_with_an_override_that_does_not_fit_changes_nothing(data_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    loop.train(validate(_data(data_root)), run, stop_after=2)
    config = (run / "config.yaml").read_bytes()
    recipe = _write_recipe(tmp_path, _data(data_root))
    code, out = _pretrain("--recipe", str(recipe), "--run-dir", str(run), "--resume", "auto",
                          "model.overrides.width=128")
    assert code == 2 and "does not fit this run" in out, out
    assert (run / "config.yaml").read_bytes() == config
    code, out = _pretrain("--recipe", str(recipe), "--run-dir", str(run), "--resume", "auto")
    assert code == 0, out
    assert (run / "final" / "model.safetensors").is_file()


def test_a_run_that_never_took_a_step_does_not_block_the_corrected_rerun(data_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    bad = _data(data_root)
    bad["model"]["overrides"]["heads"] = 5  # width 64 is not divisible by 5: refused when the model is built
    code, out = _pretrain("--recipe", str(_write_recipe(tmp_path, bad)), "--run-dir", str(run))
    assert code == 2 and "not divisible by heads 5" in out, out
    assert not (run / "config.yaml").exists()
    code, out = _pretrain("--recipe", str(_write_recipe(tmp_path, _data(data_root))), "--run-dir", str(run))
    assert code == 0, out
    code, out = _pretrain("--recipe", str(_write_recipe(tmp_path, _data(data_root))), "--run-dir", str(run))
    assert code == 2 and "already holds a run" in out  # one that took its steps still does


def test_a_task_of_sampling_weight_zero_is_never_drawn(data_root: Path, tmp_path: Path):
    data = _data(data_root, checkpoint_every=0)
    data["tasks"].append({**data["tasks"][0], "name": "never", "data": "broken", "sampling_weight": 0})
    loop.train(validate(data), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all("cls/loss" in r and "never/loss" not in r for r in records)


def test_a_split_whose_every_shard_is_unreadable_stops_in_one_line(data_root: Path, tmp_path: Path):
    code, out = _pretrain("--recipe", str(_write_recipe(tmp_path, _data(data_root, "broken"))), "--run-dir",
                          str(tmp_path / "run"))
    assert code == 2, out
    assert f"task cls: no sample could be read from {data_root / 'broken'}" in out
    assert "2 shard(s) in the split; skipped: unreadable shard 2" in out and "StopIteration" not in out


# ------------------------------------------------------------------------------------------------- DeepSpeed JSON


def _deepspeed(tmp_path: Path, config: dict, run_dir: Path | None) -> dict:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    data = _data(tmp_path)
    data["engine"] = {"kind": "deepspeed", "deepspeed_config": str(path)}
    return deepspeed_config(validate(data), world_size=1, run_dir=run_dir)


@pytest.mark.parametrize("planted", [
    {"tensorboard": {"enabled": True, "output_path": "/tmp/elsewhere"}},
    {"csv_monitor": {"enabled": True, "output_path": "../../elsewhere"}},
    {"tensorboard": {"enabled": True, "output_path": "tb", "job_name": "../../../elsewhere"}},
    {"flops_profiler": {"enabled": True, "output_file": "/etc/cron.d/x"}},
    {"zero_optimization": {"offload_param": {"device": "nvme", "nvme_path": "~/nvme"}}},
    {"data_efficiency": {"data_sampling": {"curriculum_learning": {"data_cluster_path": "/data/x"}}}},
])
def test_a_deepspeed_json_cannot_name_a_path_outside_the_run(tmp_path: Path, planted: dict):
    with pytest.raises(ValueError, match="outside the run directory"):
        _deepspeed(tmp_path, planted, tmp_path / "run")


@pytest.mark.parametrize("monitor", ["wandb", "comet"])
def test_a_deepspeed_json_cannot_turn_on_a_monitor_that_reports_to_a_server(tmp_path: Path, monitor: str):
    with pytest.raises(ValueError, match=f"enables DeepSpeed's {monitor} monitor"):
        _deepspeed(tmp_path, {monitor: {"enabled": True, "project": "x"}}, tmp_path / "run")
    assert _deepspeed(tmp_path, {monitor: {"enabled": False}}, tmp_path / "run")[monitor] == {"enabled": False}


def test_the_paths_of_a_deepspeed_json_go_under_the_run_directory(tmp_path: Path):
    run = tmp_path / "run"
    config = _deepspeed(tmp_path, {"tensorboard": {"enabled": True, "output_path": "tb", "job_name": "job"},
                                   "csv_monitor": {"enabled": True},
                                   "flops_profiler": {"enabled": True, "output_file": "flops.txt"}}, run)
    assert config["tensorboard"] == {"enabled": True, "output_path": str(run / "deepspeed" / "tb"), "job_name": "job"}
    assert config["csv_monitor"] == {"enabled": True, "output_path": str(run / "deepspeed")}  # not under ~
    assert config["flops_profiler"]["output_file"] == str(run / "deepspeed" / "flops.txt")


def test_resume_refuses_a_planted_state_before_writing_the_config(data_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    loop.train(validate(_data(data_root)), run, stop_after=2)
    config = (run / "config.yaml").read_bytes()
    (run / "checkpoints" / "step-0000002" / STATE_FILE).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError):
        loop.train(validate(_data(data_root, steps=8)), run, resume="auto")
    assert (run / "config.yaml").read_bytes() == config  # steps: 4, as the run was


def test_a_model_larger_than_memory_is_refused_before_it_is_allocated(data_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    code, out = _pretrain("--recipe", str(_write_recipe(tmp_path, _data(data_root))), "--run-dir", str(run),
                          "model.overrides.width=16384", "model.overrides.layers=1000")
    assert code == 2, out
    assert "the model (1,083,4" in out and "needs 4036.0 GiB for its fp32 weights alone; this machine has" in out, out
    assert not (run / "config.yaml").exists()


def test_a_patch_grid_that_would_fill_memory_is_refused():
    from uniperceiver_cli.model.config import get_config

    with pytest.raises(ValueError, match="gives 67108864 patches per frame; at most 65536"):
        get_config("tiny", image_size=8192, patch_size=1)


def test_a_failed_final_bundle_write_is_one_line_and_leaves_no_partial_file(data_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, limit[1]))
    try:
        code, out = _pretrain("--recipe", str(_write_recipe(tmp_path, _data(data_root, checkpoint_every=0))),
                              "--run-dir", str(run))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert code == 2, out
    assert f"error: cannot write {run / 'final'}: " in out and "File too large (os error 27); No checkpoint" in out, out
    assert not list((run / "final").glob("*.tmp")) and not (run / "final" / "model.safetensors").exists()
