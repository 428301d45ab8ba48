"""Training never runs planted code, never shares a run directory, and never ends in a silently broken model."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from tests.helpers import Planted, random_png
from uniperceiver_cli.checkpoints.errors import CheckpointError
from uniperceiver_cli.checkpoints.runs import RNG_DIR, STATE_FILE, rng_file, step_folders
from uniperceiver_cli.cli.app import app
from uniperceiver_cli.data.shards import Manifest, Sample, write_shards
from uniperceiver_cli.train import checkpointing, loop, run_log
from uniperceiver_cli.train.engines.single import load_state_file
from uniperceiver_cli.train.recipe import validate
from uniperceiver_cli.train.tasks import TrainTask

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["red", "green", "blue"]
BAD = 2  # undecodable images in the split


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 images in 2 shards; the last two are not images (counted as skipped each time they are read)."""
    root = tmp_path_factory.mktemp("safety")
    manifest = Manifest(dataset="t", split="train", modality="image", tasks=["image_classification"], source="test",
                        classes=CLASSES)
    samples = [Sample(f"s{i}", image=random_png(i) if i < 12 - BAD else b"not a png", image_ext="png", label=i % 3)
               for i in range(12)]
    write_shards(root / "split", samples, lambda s: s, manifest=manifest, min_shards=2, progress=False)
    return root


def _data(root: Path, **train) -> dict:
    return {"name": "safety", "stage": "pretrain", "data_root": str(root),
            "tasks": [{"name": "cls", "type": "image_classification", "data": "split", "batch_size": 4,
                       "augment": False}],
            "model": {"preset": "tiny", "overrides": {"image_size": 32, "layers": 1}},
            "train": {"steps": 6, "log_every": 1, "checkpoint_every": 2, **train}}


def _recipe(root: Path, **train):
    return validate(_data(root, **train))


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------- planted files


def test_resume_refuses_a_planted_state_file(data_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    loop.train(_recipe(data_root), run, stop_after=2)
    state = run / "checkpoints" / "step-0000002" / STATE_FILE
    assert load_state_file(state)["step"] == 2  # a real state loads with weights_only=True
    marker = tmp_path / "pwned"
    torch.save({"step": Planted(marker)}, state)
    with pytest.raises(CheckpointError, match="unsafe"):
        loop.train(_recipe(data_root), run, resume="auto")
    assert not marker.exists()
    state.write_bytes(state.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        loop.train(_recipe(data_root), run, resume=str(state.parent))


def test_a_state_written_by_an_older_version_still_resumes(data_root: Path, tmp_path: Path):
    """Older states hold numpy's RNG state as a tuple with an array: numpy's plain arrays are accepted."""
    run = tmp_path / "run"
    loop.train(_recipe(data_root), run, stop_after=2)
    path = run / "checkpoints" / "step-0000002" / STATE_FILE
    state = load_state_file(path)
    rng = path.parent / RNG_DIR
    saved = load_state_file(rng / rng_file(0))
    shutil.rmtree(rng)  # they kept rank 0's random state in state.pt
    np.random.seed(7)
    state.update(rng={"torch": saved["torch"], "python": saved["python"], "numpy": np.random.get_state()},
                 generator=saved["generator"])
    torch.save(state, path)
    loop.train(_recipe(data_root), run, resume="auto", stop_after=1)
    assert _records(run)[-1]["step"] == 3
    torch.save({"rng": Planted(tmp_path / "pwned")}, path)
    with pytest.raises(CheckpointError, match=r"unsafe \(it would call io.open, which a checkpoint may not\)$"):
        load_state_file(path)


def test_a_planted_random_state_is_refused_without_running(data_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    loop.train(_recipe(data_root), run, stop_after=2)
    marker = tmp_path / "pwned"
    rng = run / "checkpoints" / "step-0000002" / RNG_DIR / rng_file(0)
    torch.save({"torch": Planted(marker)}, rng)
    with pytest.raises(CheckpointError, match=f"^cannot resume from {rng}: .*unsafe"):
        loop.train(_recipe(data_root), run, resume="auto")
    torch.save({"torch": torch.zeros(3)}, rng)
    with pytest.raises(CheckpointError, match=f"^cannot resume from {rng}: not a random state"):
        loop.train(_recipe(data_root), run, resume="auto")
    assert not marker.exists()


def test_a_checkpoint_that_does_not_fit_the_run_is_one_line_before_any_data_is_read(data_root: Path,
                                                                                     tmp_path: Path):
    run = tmp_path / "run"
    loop.train(_recipe(data_root), run, stop_after=2)
    folder = run / "checkpoints" / "step-0000002"
    with pytest.raises(checkpointing.CheckpointError,
                       match="its data positions were written with 0 loader worker.s. in each of 1 process.es., "
                             "and this run has 1 in each of 1"):
        loop.train(_recipe(data_root, num_workers=1), run, resume="auto")
    with pytest.raises(checkpointing.CheckpointError, match="consumed 2 batches in 2 steps: resume with the "
                                                           "train.accumulation it was written with"):
        loop.train(_recipe(data_root, accumulation=2), run, resume="auto")
    state = load_state_file(folder / RNG_DIR / rng_file(0))
    for planted in ({"worker": 0, "epoch": -1, "in_epoch": 3}, {"worker": 7, "epoch": 0, "in_epoch": 3}, "x"):
        torch.save({**state, "data": {"cls": {**state["data"]["cls"], "positions": {0: planted}}}},
                   folder / RNG_DIR / rng_file(0))
        with pytest.raises(checkpointing.CheckpointError, match="its data positions are not ones this loader wrote"):
            loop.train(_recipe(data_root), run, resume="auto")
    torch.save({**state, "data": {"cls": {**state["data"]["cls"], "positions": {
        0: {**state["data"]["cls"]["positions"][0], "in_epoch": 10**18}}}}}, folder / RNG_DIR / rng_file(0))
    with pytest.raises(ValueError, match="lies beyond the end of its epoch"):  # passes over one epoch at most
        loop.train(_recipe(data_root), run, resume="auto")
    torch.save(state, folder / RNG_DIR / rng_file(1))  # a part of a second process
    with pytest.raises(FileNotFoundError, match="written by more processes"):
        loop.train(_recipe(data_root), run, resume="auto")


def test_cli_resume_with_a_planted_state_is_one_line(data_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    loop.train(_recipe(data_root), run, stop_after=2)
    marker = tmp_path / "pwned"
    torch.save(Planted(marker), run / "checkpoints" / "step-0000002" / STATE_FILE)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_data(data_root)))
    result = CliRunner().invoke(app, ["pretrain", "--recipe", str(recipe), "--run-dir", str(run), "--resume", "auto",
                                      "--device", "cpu"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "unsafe" in lines[0] and "Traceback" not in result.output
    assert not marker.exists()


DEEPSPEED_SCRIPT = """
import json, sys, torch
from pathlib import Path
from uniperceiver_cli.checkpoints.errors import CheckpointError
from uniperceiver_cli.train import loop
from uniperceiver_cli.parallel.context import init_distributed
from uniperceiver_cli.train.recipe import validate
from uniperceiver_cli.train.engines.single import load_state_file
from tests.helpers import Planted

recipe, run, marker = validate(json.loads(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3])
ctx = init_distributed(torch.device("cpu"))
loop.train(recipe, run, ctx=ctx, stop_after=2)
loop.train(recipe, run, ctx=ctx, resume="auto", stop_after=2)  # a real DeepSpeed checkpoint resumes
out = {"resumed": sorted(p.name for p in (run / "checkpoints").iterdir())}
for name in sorted(p.name for p in (run / "checkpoints" / "step-0000004" / "deepspeed" / "state").glob("*.pt")):
    path = run / "checkpoints" / "step-0000004" / "deepspeed" / "state" / name
    original = path.read_bytes()
    torch.save({"planted": Planted(marker)}, path)
    try:
        loop.train(recipe, run, ctx=ctx, resume="auto")
        out[name] = "loaded"
    except CheckpointError as e:
        out[name] = str(e)
    path.write_bytes(original)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("precision", ["bf16"])
def test_deepspeed_resume_refuses_planted_files(data_root: Path, tmp_path: Path, precision: str):
    """Every file of a DeepSpeed checkpoint (module states and ZeRO optimizer partitions) is loaded without
    running pickled code; DeepSpeed's own loader would have run it."""
    pytest.importorskip("deepspeed")
    data = _data(data_root, precision=precision)
    data["engine"] = {"kind": "deepspeed", "zero_stage": 1}
    marker = tmp_path / "pwned"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                      "MASTER_"))}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", DEEPSPEED_SCRIPT, json.dumps(data), str(tmp_path / "run"),
                           str(marker)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result.pop("resumed") == ["step-0000002", "step-0000004"]
    assert len(result) == 2 and any("optim_states" in name for name in result)  # model states + ZeRO partition
    for name, outcome in result.items():
        assert "unsafe" in outcome, (name, outcome)
    assert not marker.exists()


def test_deepspeed_config_refuses_the_universal_loader(tmp_path: Path):
    from uniperceiver_cli.train.engines.deepspeed import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"checkpoint": {"load_universal": True}}))
    data = _data(tmp_path)
    data["engine"] = {"kind": "deepspeed", "deepspeed_config": str(path)}
    with pytest.raises(ValueError, match="load_universal"):
        deepspeed_config(validate(data), world_size=1)


# ------------------------------------------------------------------------------------------------- run directory


def test_a_second_run_into_a_busy_run_dir_is_refused(data_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    holder = os.open(run / checkpointing.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    os.write(holder, b"4242\n")
    fcntl.flock(holder, fcntl.LOCK_EX)  # another live run holds the folder
    try:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump(_data(data_root)))
        result = CliRunner().invoke(app, ["pretrain", "--recipe", str(recipe), "--run-dir", str(run), "--device",
                                          "cpu"])
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1 and "in use by another run (process 4242)" in result.output
        assert sorted(p.name for p in run.iterdir()) == [checkpointing.LOCK_FILE]  # nothing of the run was written
    finally:
        os.close(holder)
    loop.train(_recipe(data_root, steps=2), run)  # released: the folder is usable again
    assert (run / "final" / "model.safetensors").is_file()


def test_a_killed_run_leaves_no_lock_that_blocks_resume(data_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_data(data_root, steps=100000, checkpoint_every=1)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "uniperceiver_cli", "pretrain", "--recipe", str(recipe),
                             "--run-dir", str(run), "--device", "cpu"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((run / "checkpoints").glob("step-*")) if (run / "checkpoints").exists() else True:
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach a checkpoint"
            time.sleep(0.2)
        assert (run / checkpointing.LOCK_FILE).read_text().strip() == str(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    last = int(step_folders(run)[-1].name.split("-")[1])
    final = loop.train(_recipe(data_root, steps=last + 2, checkpoint_every=1), run, resume="auto")
    assert _records(run)[-1]["step"] == last + 2 and (final / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------- broken training


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data_root: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch):
    calls = {"n": 0}
    real = TrainTask.loss

    def loss_going_nan(self, model, batch, generator):  # noqa: ANN001, ANN202
        calls["n"] += 1
        loss, metrics = real(self, model, batch, generator)
        return (loss * float("nan") if calls["n"] == 3 else loss), metrics

    monkeypatch.setattr(TrainTask, "loss", loss_going_nan)
    run = tmp_path / "run"
    with pytest.raises(checkpointing.TrainingStopped) as stopped:
        loop.train(_recipe(data_root, log_every=5), run)
    message = str(stopped.value)
    assert "\n" not in message and message.startswith("step 3: the cls loss is nan; training stopped")
    assert "checkpoints/step-0000002" in message
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]
    assert not (run / "final").exists()


def test_non_finite_weights_are_never_saved(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real = loop.SingleEngine.step

    def step_breaking_a_weight(self):  # noqa: ANN001, ANN202
        real(self)
        with torch.no_grad():  # a temperature image classification never uses: the losses stay finite
            self.model.head.logit_scale["downstream"].fill_(float("inf"))
        return torch.zeros(())  # a finite norm: only the weight check can catch it

    monkeypatch.setattr(loop.SingleEngine, "step", step_breaking_a_weight)
    stopped = r"^step 2: 1 weight tensor\(s\) are not finite \(head.logit_scale.downstream\)"
    with pytest.raises(checkpointing.TrainingStopped, match=stopped):
        loop.train(_recipe(data_root), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "final").exists()


def test_skipped_samples_are_counted_per_task(data_root: Path, tmp_path: Path, capfd: pytest.CaptureFixture):
    run = tmp_path / "run"
    loop.train(_recipe(data_root, steps=8, checkpoint_every=0), run)
    counts = [r["cls/skipped"] for r in _records(run)]
    assert counts == sorted(counts) and counts[-1] >= BAD  # 8 x 4 samples read the 12 at least twice
    assert all(r["grad_norm"] > 0 for r in _records(run))
    err = capfd.readouterr().err
    assert f"skipped while training: cls: {counts[-1]} sample(s) (undecodable image {counts[-1]})" in err
    assert re.search(r"^step 8/8  loss cls \d+\.\d{4}  ", err, re.M)  # not a terminal: plain lines, named losses


def test_a_run_dir_that_cannot_be_made_is_one_line(data_root: Path, tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the run directory's parent should be (root ignores permissions)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_data(data_root)))
    result = CliRunner().invoke(app, ["pretrain", "--recipe", str(recipe), "--run-dir", str(blocker / "run"),
                                      "--device", "cpu"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error:") and "Not a directory" in result.output


def test_metrics_are_standard_json_and_skip_overflowing_norms(tmp_path: Path):
    assert run_log._finite_mean([torch.tensor(1.0), torch.tensor(float("inf")), torch.tensor(3.0)]).item() == 2.0
    assert run_log._finite_mean([torch.tensor(float("inf"))]).isnan()
    log = run_log.RunLog(tmp_path, total=1, enabled=True)
    log.write({"step": 1, "grad_norm": float("nan"), "cls/loss": 0.5})
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "grad_norm": None, "cls/loss": 0.5}


def test_an_evaluation_that_cannot_run_does_not_end_training(data_root: Path, tmp_path: Path,
                                                              capfd: pytest.CaptureFixture):
    (data_root / "other.txt").write_text("violet\number\n")  # names no class of the split
    data = _data(data_root, steps=2, checkpoint_every=0)
    data["evaluation"] = {"every": 1, "tasks": [
        {"name": "bad", "type": "image_classification", "data": "split", "labels": "other.txt"},
        {"name": "good", "type": "image_classification", "data": "split"}]}
    final = loop.train(validate(data), tmp_path / "run")
    assert (final / "model.safetensors").is_file()
    summary = json.loads((tmp_path / "run" / "eval" / "final" / "summary.json").read_text())
    assert list(summary["results"]) == ["good"] and "is a class of the data" in summary["errors"]["bad"]
    assert "evaluation bad after step 1 failed:" in capfd.readouterr().err
