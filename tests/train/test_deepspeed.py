"""``engine: deepspeed`` on CPU: two gloo processes train exactly like one process at the same global batch.

The exact construction. The split has 2 shards of ``B`` distinct images each. Each process of a 2-process run
reads its own shard (the loader deals shards to processes), so with ``batch_size: B`` every micro-batch of
rank r is all of shard ``order[r]`` (``order`` is the epoch's shard order, the same on every process), and the
single process with ``batch_size: 2B`` reads ``order[0]`` then ``order[1]``: every micro-batch is both shards.
The global batch of every micro-step is then the same set of samples in both runs, and since every per-sample
loss is independent of the others (LayerNorm, no batch statistics), the mean over 2B equals the mean of the two
B-means, gradient included. Two things would blur it, so they are switched off: random augmentation (the tasks
set ``augment: false``) and the loader's sample shuffle buffer, which draws across epochs from a per-process RNG
(the runs get ``shuffle_buffer=1``, i.e. the shard's own order, by wrapping ``make_loader``).

Why not identical samples: then both processes would compute the same gradient, and training would match
even if DeepSpeed never reduced the gradients. Here the ranks' data differ, so a missing or mis-scaled
all-reduce changes the weights.

The DeepSpeed runs are real launches: two ``python`` processes with the environment of ``torchrun``
(``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``) or of SLURM ``srun`` (``SLURM_PROCID``/``SLURM_NTASKS``/
``SLURM_LOCALID``/``SLURM_JOB_NODELIST``), through :func:`init_distributed` and :func:`train`.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import random_png
from uniperceiver_cli.data.shards import Manifest, Sample, write_shards
from uniperceiver_cli.parallel.context import first_host, launcher_env
from uniperceiver_cli.train import loop
from uniperceiver_cli.train.engines.deepspeed import deepspeed_config
from uniperceiver_cli.train.recipe import validate

pytest.importorskip("deepspeed")
# Tests that start several processes run one after another on one xdist worker (Makefile: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("processes")

REPO = Path(__file__).resolve().parents[2]
B = 2  # samples per process per micro-batch; the single process takes 2 * B
CLASSES = ["red", "green", "blue"]
STEPS = 4
ATOL = 1e-5


# ------------------------------------------------------------------------------------------------- data, runs


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dp")
    manifest = Manifest(dataset="dp", split="train", modality="image", tasks=["image_classification"],
                        source="test", classes=CLASSES)
    samples = [Sample(f"s{i}", image=random_png(i), image_ext="png", label=i % len(CLASSES)) for i in range(2 * B)]
    written = write_shards(root / "split", samples, lambda s: s, manifest=manifest, min_shards=2, progress=False)
    assert [s.samples for s in written.shards] == [B, B]
    return root


def _recipe(root: Path, *, batch_size: int, kind: str, zero: int = 0, accumulation: int = 1,
            checkpoint_every: int = 0) -> dict:
    return {
        "name": "dp", "stage": "pretrain", "data_root": str(root),
        "tasks": [{"name": "cls", "type": "image_classification", "data": "split", "batch_size": batch_size,
                   "augment": False}],
        # layer_scale_init 1.0: at the reference's 1e-3 the tiny model's logits start flat and its gradients
        # are near AdamW's eps, where g / (sqrt(v) + eps) turns float round-off into visible weight differences.
        # max_frames 1: an image takes a random temporal row in training, drawn per process (one row: none to draw).
        "model": {"preset": "tiny", "overrides": {"image_size": 32, "layer_scale_init": 1.0, "max_frames": 1}},
        "train": {"steps": STEPS, "lr": 2e-3, "warmup_steps": 0, "grad_clip": 0.1, "accumulation": accumulation,
                  "precision": "fp32", "log_every": 1, "checkpoint_every": checkpoint_every, "seed": 3,
                  "split_targets": 2},  # the 3 class names: split across the processes
        "engine": {"kind": kind, "zero_stage": zero},
    }


def _unshuffled(make_loader):  # noqa: ANN001, ANN202
    return functools.partial(make_loader, shuffle_buffer=1)


def rank_main(recipe_json: str, run_dir: str, resume: str, stop_after: str) -> None:
    """One process of a DeepSpeed run (``python -c``): what ``uniperceiver pretrain`` does under a launcher."""
    from uniperceiver_cli.parallel.context import init_distributed

    loop.make_loader = _unshuffled(loop.make_loader)
    recipe = validate(json.loads(recipe_json))
    ctx = init_distributed(torch.device("cpu"), timedelta(minutes=recipe.engine.timeout_minutes))
    loop.train(recipe, Path(run_dir), resume=resume or None, ctx=ctx,
               stop_after=int(stop_after) if stop_after else None)
    torch.distributed.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(recipe: dict, run_dir: Path, *, launcher: str, resume: str = "", stop_after: int | None = None,
            timeout: float = 240, processes: int = 2, node_dirs: bool = False, fails: bool = False,
            prelude: str = "", kill_at: Path | None = None) -> list[str]:
    """Start the processes as ``torchrun`` or ``srun`` would and wait for all; on failure stop the others.
    ``node_dirs``: each process gets a run directory of its own (nodes that share none). ``fails``: every
    process must exit with an error; their logs are returned. ``prelude``: Python each process runs first.
    ``kill_at``: once this path exists, every process is killed (SIGKILL), as a crashed job would be."""
    port = _port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                       "MASTER_"))}
    base.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    code = f"import sys\n{prelude}\nfrom tests.train.test_deepspeed import rank_main; rank_main(*sys.argv[1:])"
    procs, logs = [], []
    for rank in range(processes):
        folder = run_dir.with_name(f"{run_dir.name}-node{rank}") if node_dirs else run_dir
        args = [json.dumps(recipe), str(folder), resume, "" if stop_after is None else str(stop_after)]
        env = dict(base)
        if launcher == "torchrun":
            env.update(RANK=str(rank), WORLD_SIZE=str(processes), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        else:  # srun: only SLURM's variables; MASTER_ADDR comes from the node list
            env.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(processes), SLURM_LOCALID=str(rank),
                       SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="123", MASTER_PORT=str(port))
        log = (run_dir.parent / f"{run_dir.name}-rank{rank}.log").open("w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if (failed and not fails) or time.monotonic() > deadline:
                break
            if kill_at is not None and kill_at.exists():
                for p in procs:
                    p.kill()
                    p.wait()
                return []
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    texts = [(run_dir.parent / f"{run_dir.name}-rank{rank}.log").read_text() for rank in range(processes)]
    for rank, p in enumerate(procs):
        if (p.returncode != 0) != fails:
            pytest.fail(f"rank {rank} exited with {p.returncode}:\n{texts[rank][-4000:]}")
    return texts


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_training(single: Path, parallel: Path) -> None:
    a, b = _metrics(single), _metrics(parallel)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b, strict=True):
        for key in ("cls/loss", "cls/acc", "lr"):
            assert rb[key] == pytest.approx(ra[key], abs=ATOL), (ra["step"], key)
    wa, wb = load_file(single / "final" / "model.safetensors"), load_file(parallel / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < ATOL, worst
    start = loop.build_model(validate(_recipe(Path("."), batch_size=B, kind="single"))).state_dict()
    assert max((wa[k] - start[k]).abs().max().item() for k in wa) > 100 * ATOL  # it did train


@pytest.fixture(scope="module")
def single(data_root: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """The single-process reference runs (batch 2B), by accumulation, each trained once."""
    runs: dict[int, Path] = {}

    def run(accumulation: int) -> Path:
        if accumulation not in runs:
            out = tmp_path_factory.mktemp(f"single-acc{accumulation}")
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(loop, "make_loader", _unshuffled(loop.make_loader))
                loop.train(validate(_recipe(data_root, batch_size=2 * B, kind="single", accumulation=accumulation)),
                           out)
            runs[accumulation] = out
        return runs[accumulation]

    return run


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("zero", "accumulation"), [(0, 1), (1, 2)], ids=["zero0", "zero1-accumulation2"])
def test_two_processes_equal_one(data_root: Path, tmp_path: Path, single, zero: int, accumulation: int):  # noqa: ANN001
    """torchrun's environment; ZeRO 0 (all-reduce) and ZeRO 1 (partitioned optimizer state)."""
    recipe = _recipe(data_root, batch_size=B, kind="deepspeed", zero=zero, accumulation=accumulation)
    _launch(recipe, tmp_path / "ds", launcher="torchrun")
    _assert_same_training(single(accumulation), tmp_path / "ds")


def test_zero2_accumulation_resume_two_processes_equal_one(data_root: Path, tmp_path: Path, single):  # noqa: ANN001
    """srun's environment, ZeRO 2 (partitioned gradients and optimizer state), accumulation 2, and an
    interruption after step 2 resumed from DeepSpeed's checkpoint with ``--resume auto``."""
    recipe = _recipe(data_root, batch_size=B, kind="deepspeed", zero=2, accumulation=2, checkpoint_every=2)
    run = tmp_path / "ds"
    _launch(recipe, run, launcher="srun", stop_after=2)
    checkpoint = run / "checkpoints" / "step-0000002" / "deepspeed"
    assert (checkpoint / "latest").read_text() == "state"
    assert len(list((checkpoint / "state").glob("*optim_states.pt"))) == 2  # one ZeRO partition per process
    assert not (run / "final").exists()
    _launch(recipe, run, launcher="srun", resume="auto")
    _assert_same_training(single(2), run)


@pytest.mark.parametrize(("zero", "accumulation"), [(0, 2), (1, 1)], ids=["zero0-accumulation2", "zero1"])
def test_bf16_follows_fp32(data_root: Path, tmp_path: Path, single, zero: int, accumulation: int):  # noqa: ANN001
    """bf16 (autocast over fp32 weights) stays within bf16 rounding of fp32 training."""
    recipe = _recipe(data_root, batch_size=B, kind="deepspeed", zero=zero, accumulation=accumulation)
    recipe["train"]["precision"] = "bf16"
    _launch(recipe, tmp_path / "ds", launcher="torchrun")
    fp32, bf16 = _metrics(single(accumulation)), _metrics(tmp_path / "ds")
    # Steps 1 and 2: by step 3 this tiny model's loss is near 0 (0.08, then 0.002), where bf16 round-off is tens
    # of percent of it. A wrong first update (DeepSpeed's extra start-up step: 12% off) shows at step 2.
    assert [r["cls/loss"] for r in bf16][:2] == pytest.approx([r["cls/loss"] for r in fp32][:2], rel=0.05)
    assert load_file(tmp_path / "ds" / "final" / "model.safetensors")["head.proj.weight"].dtype == torch.float32


DTYPES_SCRIPT = """
import json, sys, torch
from pathlib import Path
from uniperceiver_cli.model.precision import autocast
from uniperceiver_cli.parallel.context import init_distributed
from uniperceiver_cli.train.engines.deepspeed import DeepSpeedEngine
from uniperceiver_cli.train.loop import build_model
from uniperceiver_cli.train.recipe import validate

ctx = init_distributed(torch.device("cpu"))
recipe = validate(json.loads(sys.argv[1]))
engine = DeepSpeedEngine(build_model(recipe), recipe, ctx, Path(sys.argv[2]))
model = engine.model
tokens = torch.randint(0, 1000, (2, 6))
with autocast(ctx.device, recipe.train.precision):
    features = model.encode_text(tokens)
    loss = features.float().pow(2).mean() + sum(s.float() for s in model.head.logit_scale.values())
engine.backward(loss)
optimizer = engine.engine.optimizer
zero = getattr(optimizer, "gradient_accumulation_dtype", None)  # ZeRO 1/2 accumulate into buffers of this dtype
grads = [str(zero)] if zero else sorted({str(p.grad.dtype) for p in model.parameters() if p.grad is not None})
norms = sorted({str(p.dtype) for n, p in model.named_parameters() if "norm" in n or "gamma" in n or "scale" in n})
engine.micro_step()
inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the recipe's AdamW
states = sorted({str(v.dtype) for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0}
                | {str(p.dtype) for g in inner.param_groups for p in g["params"]})
params = sorted({str(p.dtype) for p in model.parameters()})
print("RESULT " + json.dumps({"compute": str(features.dtype), "params": params, "grads": grads, "norms": norms,
                              "states": states}))
"""


@pytest.mark.parametrize("zero", [0, 1])
def test_bf16_keeps_fp32_weights_gradients_and_optimizer_state(tmp_path: Path, zero: int):
    """bf16 computes in bf16 (autocast) over fp32 weights: LayerNorms, LayerScale and logit scales, gradients
    (accumulated and all-reduced) and AdamW's moments stay fp32."""
    recipe = _recipe(tmp_path, batch_size=B, kind="deepspeed", zero=zero)
    recipe["train"]["precision"] = "bf16"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                      "MASTER_"))}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", DTYPES_SCRIPT, json.dumps(recipe), str(tmp_path / "run")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["compute"] == "torch.bfloat16"
    assert result["params"] == result["grads"] == result["norms"] == result["states"] == ["torch.float32"]


def _toyworld_recipe(root: Path, steps: int) -> dict:
    """Classification and MLM with drop path: every process draws masks, noise and masking amounts."""
    return {
        "name": "rng", "stage": "pretrain", "data_root": str(root),
        "tasks": [{"name": "shape", "type": "image_classification", "data": "images/train", "label_set": "shape",
                   "batch_size": 4, "augment": False},
                  {"name": "mlm", "type": "text_mlm", "data": "text/train", "batch_size": 4, "max_text_len": 32,
                   "vocabulary": "sampled", "negatives": 32}],
        "model": {"preset": "tiny", "overrides": {"image_size": 32, "layers": 2, "drop_path": 0.3}},
        "train": {"steps": steps, "lr": 1e-3, "warmup_steps": 0, "log_every": 1, "checkpoint_every": 3, "seed": 5},
        "engine": {"kind": "deepspeed", "zero_stage": 0},
    }


SLOW_STEPS = """
import time
from uniperceiver_cli.train.tasks import TrainTask
loss = TrainTask.loss
TrainTask.loss = lambda *args, **kwargs: (time.sleep(0.4), loss(*args, **kwargs))[1]
"""


def test_two_processes_with_mlm_resume_exactly_and_draw_apart(tmp_path: Path):
    """Killed (SIGKILL, both processes) once the step-3 checkpoint is there and resumed, a 2-process run with MLM
    masking and drop path equals the uninterrupted run: each process gets its own random state and data position
    back. The processes draw different random numbers."""
    from uniperceiver_cli.data.toyworld import generate

    root = tmp_path / "toyworld"
    generate(root, size="tiny", image_size=32, num_frames=4, min_shards=2, progress=False)
    recipe = _toyworld_recipe(root, steps=6)
    _launch(recipe, tmp_path / "full", launcher="torchrun")
    part = tmp_path / "part"
    checkpoint = part / "checkpoints" / "step-0000003"
    _launch(recipe, part, launcher="torchrun", prelude=SLOW_STEPS, kill_at=checkpoint)  # slowed: 5 steps take 4 s
    assert not (part / "final").exists()
    states = [torch.load(checkpoint / "rng" / f"rank-{r:05d}.pt") for r in (0, 1)]
    assert not torch.equal(states[0]["torch"], states[1]["torch"])
    assert not torch.equal(states[0]["generator"], states[1]["generator"])
    _launch(recipe, part, launcher="torchrun", resume="auto")
    timeless = [[{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in _metrics(run)]
                for run in (tmp_path / "full", part)]
    assert timeless[0] == timeless[1] and len(timeless[0]) == 6
    assert sum("mlm/loss" in r for r in timeless[0]) >= 2 and sum("shape/loss" in r for r in timeless[0]) >= 2
    a, b = load_file(tmp_path / "full" / "final" / "model.safetensors"), load_file(part / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nodes_without_a_shared_run_directory_are_refused_and_an_incomplete_checkpoint_is_one_line(
        data_root: Path, tmp_path: Path):
    """Two "nodes" on localhost, each with its own run directory: both processes stop at the start with the same
    line, before training. A checkpoint missing one process's part stops both processes instead of leaving one
    waiting in a collective."""
    recipe = _recipe(data_root, batch_size=B, kind="deepspeed", checkpoint_every=2)
    logs = _launch(recipe, tmp_path / "ds", launcher="torchrun", node_dirs=True, fails=True, timeout=120)
    for log in logs:
        assert "ValueError: " in log and "is not shared by every process of the run" in log, log[-2000:]
    assert not list(tmp_path.glob("ds-node*/metrics.jsonl"))
    run = tmp_path / "shared"
    _launch(recipe, run, launcher="torchrun", stop_after=2)
    (run / "checkpoints" / "step-0000002" / "rng" / "rank-00001.pt").unlink()
    logs = _launch(recipe, run, launcher="torchrun", resume="auto", fails=True, timeout=120)
    for log in logs:
        assert "FileNotFoundError: " in log and "step-0000002 is incomplete: the part of a process is missing" in log


SLOW_EVALUATION = """
import time
from uniperceiver_cli.train import loop

evaluate = loop._evaluate
def slow(*args, **kwargs):
    time.sleep(20)
    return evaluate(*args, **kwargs)
loop._evaluate = slow
"""


def test_an_evaluation_longer_than_the_collective_timeout_leaves_no_process_timed_out(data_root: Path,
                                                                                     tmp_path: Path):
    """The main process evaluates during training for 20 s; the run's collectives time out after 6 s
    (``engine.timeout_minutes: 0.1``). The other process waits for it in a group of its own and training goes on."""
    recipe = _recipe(data_root, batch_size=B, kind="deepspeed")
    recipe["engine"]["timeout_minutes"] = 0.1
    recipe["evaluation"] = {"every": 2, "tasks": [{"name": "cls", "type": "image_classification", "data": "split"}]}
    _launch(recipe, tmp_path / "ds", launcher="torchrun", prelude=SLOW_EVALUATION)
    assert (tmp_path / "ds" / "eval" / "step-2" / "summary.json").is_file()
    assert [r["step"] for r in _metrics(tmp_path / "ds") if "lr" in r] == list(range(1, STEPS + 1))


# ------------------------------------------------------------------------------------------------- units


def test_launcher_environments(monkeypatch: pytest.MonkeyPatch):
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}
    assert launcher_env(torchrun) == {}
    monkeypatch.setattr("shutil.which", lambda name: None)  # no scontrol: the node list is read here
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NODELIST": "gpu[07-09,12],cpu1"}
    assert launcher_env(slurm) == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                                   "MASTER_PORT": str(29500 + 4242)}
    assert launcher_env({**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "7"}) == {
        "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}
    alone = launcher_env({})
    assert (alone["RANK"], alone["WORLD_SIZE"], alone["LOCAL_RANK"]) == ("0", "1", "0")
    assert first_host("node1") == "node1" and first_host("a-b[003-004]") == "a-b003"


def test_config_merges_the_users_json_with_the_recipe(tmp_path: Path):
    user = {"train_batch_size": 512, "train_micro_batch_size_per_gpu": 64, "gradient_clipping": 5.0,
            "zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 1000},
            "fp16": {"enabled": False, "hysteresis": 4}, "wall_clock_breakdown": True}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    recipe = _recipe(tmp_path, batch_size=B, kind="deepspeed", zero=1, accumulation=4)
    recipe["engine"]["deepspeed_config"] = str(path)
    recipe["train"]["precision"] = "fp16"
    config = deepspeed_config(validate(recipe), world_size=8)
    assert config["train_micro_batch_size_per_gpu"] == 1 and config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 32 and config["gradient_clipping"] == 0.1
    assert config["zero_optimization"] == {"stage": 1, "overlap_comm": True, "reduce_bucket_size": 1000}
    assert config["fp16"] == {"enabled": True, "initial_scale_power": 13, "loss_scale_window": 200, "hysteresis": 4}
    assert config["bf16"] == {"enabled": False} and config["wall_clock_breakdown"] is True
    recipe["train"]["precision"] = "bf16"
    config = deepspeed_config(validate(recipe), world_size=8)
    assert not config["bf16"]["enabled"] and not config["fp16"]["enabled"]  # bf16: the loop's autocast
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="optimizer"):
        deepspeed_config(validate(recipe), world_size=1)
