"""One script that checks on a GPU what the CPU can only predict; prints one markdown table.

Sections (``--skip NAME`` leaves one out):

- ``environment``: torch, CUDA, the device, DeepSpeed.
- ``attention``: which SDPA kernels (flash, memory-efficient, cuDNN, math) can serve each kind of attention call
  the model makes (captured from real calls: images, unpadded and padded texts, the captioning layout).
- ``syncs``: a training step of every task family on ToyWorld (tiny, and tiny-moe with token routing): on CUDA the
  operations ``torch.cuda.set_sync_debug_mode`` reports, on the CPU the host-sync census
  (uniperceiver_cli/train/host_syncs.py).
- ``memory``: the peak memory of a captioning training step at several batches beside ``recipes plan``'s
  prediction (on the CPU the plan only: there is no device allocator to read).
- ``throughput``: training images/s of our image tower (against 1,000 fixed class features) and of timm's ViT of
  the same width and depth (``vit_base_patch16_224`` for ``base``; ``--small`` pairs tiny with ViT-Ti, a larger
  model) in the same process: bf16 autocast, fused AdamW; eager, and compiled unless ``--no-compile``.
- ``resume``: a ToyWorld run stopped and resumed on the device, against the uninterrupted run.
- ``deepspeed``: a DeepSpeed world of one (bf16, ZeRO 0 and 1) trains ToyWorld through the CLI.

On one H100 (the default sizes: base, ViT-B/16, batch 128) it should take under 8 minutes; it is never part of
``make test``. ``--device cpu --small`` runs every section at tiny sizes, with fewer sync steps and ZeRO 1 only
(tests/test_gpu_check.py).

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --device cpu --small
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from uniperceiver_cli.data.toyworld import generate
from uniperceiver_cli.model.config import get_config
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.parallel.context import Context
from uniperceiver_cli.task_types import TASKS
from uniperceiver_cli.train.engines.single import SingleEngine
from uniperceiver_cli.train.loop import build_model, train
from uniperceiver_cli.train.plan import GIB, StepShape, _batch, plan_recipe
from uniperceiver_cli.train.recipe import validate
from uniperceiver_cli.train.tasks import TrainTask

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sync_census", Path(__file__).with_name("sync_census.py"))
sync_census = importlib.util.module_from_spec(_spec)
sys.modules["sync_census"] = sync_census
_spec.loader.exec_module(sync_census)
SECTIONS = ("environment", "attention", "syncs", "memory", "throughput", "resume", "deepspeed")
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


@dataclass(frozen=True)
class Sizes:
    preset: str  # our model for attention, memory and throughput
    timm_model: str  # timm's ViT of the same width and depth
    image_size: int
    batch: int  # throughput
    steps: int  # timed throughput steps (after 2 warm-up steps)
    memory_batches: tuple[int, ...]  # caption steps
    negatives: int  # the caption step's sampled vocabulary: the batch's tokens plus these
    sync_models: tuple[str, ...]  # models of benchmarks/sync_census.py whose steps are checked
    sync_tasks: tuple[str, ...]  # and tasks
    zero_stages: tuple[int, ...]  # the DeepSpeed world of one's


FULL = Sizes("base", "vit_base_patch16_224", 224, 128, 10, (16, 32, 64), 8192, ("tiny", "tiny-moe token"),
             tuple(sync_census.TASKS), (0, 1))
# The CPU test's: tiny-moe's steps run its dense and expert blocks; ZeRO 1 runs the DeepSpeed path ZeRO 0 does.
SMALL = Sizes("tiny", "vit_tiny_patch16_224", 32, 4, 2, (2, 4), 64, ("tiny-moe token",),
              ("image classification", "caption (corpus)", "mlm (sampled)"), (1,))
Row = tuple[str, str, str]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------- sections
def environment(device: torch.device) -> Iterator[Row]:
    import deepspeed

    yield "environment", "python, torch", f"{platform.python_version()}, {torch.__version__}"
    yield "environment", "deepspeed", deepspeed.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        yield "environment", "device", f"{props.name}, {props.total_memory / GIB:.1f} GiB, CUDA {torch.version.cuda}"
        yield "environment", "bf16", str(torch.cuda.is_bf16_supported())
    else:
        yield "environment", "device", f"CPU ({os.cpu_count()} cores, {platform.machine()})"


class _Attention(TorchFunctionMode):
    """Keeps the arguments of the first scaled_dot_product_attention call."""

    def __init__(self) -> None:
        super().__init__()
        self.call: tuple | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.call is None:
            self.call = (*args[:3], kwargs.get("attn_mask"))
        return func(*args, **kwargs)


def attention(device: torch.device, sizes: Sizes) -> Iterator[Row]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = UniPerceiver(get_config(sizes.preset, image_size=sizes.image_size)).to(device).eval()
    images = torch.randn(2, 3, sizes.image_size, sizes.image_size, device=device)
    ids = torch.randint(1, 1000, (2, 12), device=device)
    padding = torch.zeros(2, 12, dtype=torch.bool, device=device)
    padding[0, 8:] = True
    calls: dict[str, Callable[[], object]] = {
        "images, videos (no mask)": lambda: model.encode_image(images),
        "texts, nothing padded (no mask)": lambda: model.encode_text(ids),
        "texts with padding (key mask)": lambda: model.encode_text(ids, padding),
        "captioning layout (structure mask)": lambda: model.caption_logits(images, ids, padding,
                                                                          torch.randn(8, model.config.width,
                                                                                      device=device)),
    }
    for name, call in calls.items():
        mode = _Attention()
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"), mode:
            call()
        q, k, v, mask = mode.call
        q, k, v = (t.to(dtype) for t in (q, k, v))
        served = []
        for backend_name, backend in BACKENDS.items():
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                served.append(backend_name)
            except RuntimeError:
                continue
        yield "attention", name, ", ".join(served) or "none"


def syncs(device: torch.device, root: Path, sizes: Sizes) -> Iterator[Row]:
    for model in sizes.sync_models:
        for task in sizes.sync_tasks:
            if device.type == "cuda":
                setup = sync_census.setup_step(root, model, task, device)
                setup.run(1)
                _sync(device)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        setup.run(2)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                found = [str(w.message).split("\n")[0][:60] for w in caught if "synchroniz" in str(w.message)]
                result = f"{len(found)}" + (f" ({found[0]})" if found else "")
            else:
                census = sync_census.step_census(root, model, task)
                result = f"{census.total} (census)"
            yield "syncs", f"{model}: {task}", result


def memory(device: torch.device, sizes: Sizes) -> Iterator[Row]:
    for batch in sizes.memory_batches:
        recipe = validate({"name": f"caption-{batch}", "stage": "pretrain", "data_root": "data",
                           "tasks": [{"name": "caption", "type": "image_caption", "data": "unused",
                                      "batch_size": batch, "vocabulary": "sampled", "negatives": sizes.negatives,
                                      "max_text_len": 30, "augment": False}],
                           "model": {"preset": sizes.preset, "overrides": {"image_size": sizes.image_size}},
                           "train": {"precision": "bf16", "steps": 1}})
        planned = plan_recipe(recipe, gpus=1).total
        spec = recipe.tasks[0]
        model = build_model(recipe)
        engine = SingleEngine(model, recipe, Context(device=device))
        task = TrainTask(spec, TASKS[spec.type], Path("unused"), None)
        step_batch = _batch(spec, StepShape(batch, sizes.image_size, 1, spec.max_text_len), model.config.vocab_size)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = task.loss(engine.model, step_batch, torch.Generator().manual_seed(0))
        engine.backward(loss)
        engine.step()
        _sync(device)
        measured = f"{torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB" if device.type == "cuda" else "-"
        yield "memory", f"{sizes.preset} caption step, batch {batch}", f"{measured} (plan {planned / GIB:.2f} GiB)"
        del engine, model, loss


def _images_per_s(step: Callable[[], None], sizes: Sizes, device: torch.device) -> float:
    for _ in range(2):
        step()
    _sync(device)
    tic = time.perf_counter()
    for _ in range(sizes.steps):
        step()
    _sync(device)
    return sizes.batch * sizes.steps / (time.perf_counter() - tic)


def throughput(device: torch.device, sizes: Sizes, compile: bool) -> Iterator[Row]:
    import timm

    images = torch.randn(sizes.batch, 3, sizes.image_size, sizes.image_size, device=device)
    labels = torch.randint(0, 1000, (sizes.batch,), device=device)
    for mode in ("eager", "compiled") if compile else ("eager",):
        ours = UniPerceiver(get_config(sizes.preset, image_size=sizes.image_size)).to(device).train()
        classes = F.normalize(torch.randn(1000, ours.config.width, device=device), dim=-1)  # class features, fixed
        vit = timm.create_model(sizes.timm_model, pretrained=False, img_size=sizes.image_size,
                                num_classes=1000).to(device).train()
        if mode == "compiled":
            ours.compile_blocks()
            vit = torch.compile(vit)
        ours_logits = functools.partial(ours.classification_logits, targets=classes)
        for name, forward, params in (("ours", ours_logits, ours), (sizes.timm_model, vit, vit)):
            optimizer = torch.optim.AdamW(params.parameters(), lr=1e-4, fused=True)

            def step(forward=forward, optimizer=optimizer) -> None:  # noqa: ANN001
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = F.cross_entropy(forward(images).float(), labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            rate = _images_per_s(step, sizes, device)
            yield "throughput", f"{name}, {mode}, batch {sizes.batch}", f"{rate:.1f} images/s"


def _toyworld_recipe(root: Path, device: torch.device, **engine: object) -> dict:
    return {"name": "check", "stage": "pretrain", "data_root": str(root),
            "tasks": [{"name": "shape", "type": "image_classification", "data": "images/train",
                       "label_set": "shape", "batch_size": 8, "augment": False},
                      {"name": "mlm", "type": "text_mlm", "data": "text/train", "batch_size": 4, "max_text_len": 32,
                       "vocabulary": "sampled", "negatives": 32}],
            "model": {"preset": "tiny", "overrides": {"image_size": 32, "layers": 2, "drop_path": 0.1}},
            "train": {"steps": 4, "lr": 1e-3, "log_every": 1, "checkpoint_every": 2,
                      "precision": "bf16" if device.type == "cuda" else "fp32"},
            "engine": engine or {"kind": "single"}}


def resume(device: torch.device, root: Path, out: Path) -> Iterator[Row]:
    recipe = validate(_toyworld_recipe(root, device))
    ctx = Context(device=device)
    whole = train(recipe, out / "whole", ctx=ctx)
    train(recipe, out / "part", ctx=ctx, stop_after=3)
    resumed = train(recipe, out / "part", ctx=ctx, resume="auto")
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    losses = [[r.get("shape/loss"), r.get("mlm/loss")] for run in ("whole", "part")
              for r in map(json.loads, (out / run / "metrics.jsonl").read_text().splitlines())]
    same = losses[:4] == losses[4:]
    yield "resume", "stopped after 3 of 4 steps, resumed", \
        f"losses {'equal' if same else 'differ'}, weights differ by at most {diff:.2e}"


def deepspeed_world_of_one(device: torch.device, root: Path, out: Path, sizes: Sizes) -> Iterator[Row]:
    for zero in sizes.zero_stages:
        recipe = _toyworld_recipe(root, device, kind="deepspeed", zero_stage=zero)
        recipe["train"]["precision"] = "bf16"
        path = out / f"deepspeed-{zero}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                          "MASTER_", "SLURM_"))}
        env["HF_HUB_OFFLINE"] = "1"
        done = subprocess.run([sys.executable, "-m", "uniperceiver_cli", "pretrain", "--recipe", str(path),
                               "--run-dir", str(out / f"deepspeed-{zero}"), "--device", device.type],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            yield "deepspeed", f"world of one, bf16, ZeRO {zero}", f"failed: {done.stderr.strip()[-200:]}"
            continue
        last = json.loads((out / f"deepspeed-{zero}" / "metrics.jsonl").read_text().splitlines()[-1])
        losses = ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k.endswith("/loss"))
        yield "deepspeed", f"world of one, bf16, ZeRO {zero}", f"4 steps, last: {losses}"


# ---------------------------------------------------------------------------------------------------- main
def run(device: torch.device, sizes: Sizes, skip: set[str], compile: bool) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        root = out / "toyworld"
        generate(root, size="tiny", image_size=32, num_frames=2, min_shards=1, progress=False)
        sections = {
            "environment": lambda: environment(device),
            "attention": lambda: attention(device, sizes),
            "syncs": lambda: syncs(device, root, sizes),
            "memory": lambda: memory(device, sizes),
            "throughput": lambda: throughput(device, sizes, compile),
            "resume": lambda: resume(device, root, out),
            "deepspeed": lambda: deepspeed_world_of_one(device, root, out, sizes),
        }
        for name, section in sections.items():
            if name in skip:
                continue
            tic = time.perf_counter()
            try:
                rows.extend(section())
            except Exception as error:  # noqa: BLE001 - one failing check must not hide the others
                rows.append((name, "error", f"{type(error).__name__}: {str(error)[:200]}"))
            rows.append((name, "seconds", f"{time.perf_counter() - tic:.1f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="tiny sizes (the CPU test)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled throughput rows")
    parser.add_argument("--skip", action="append", default=[], choices=SECTIONS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; pass --device cpu --small")
    device = torch.device(args.device)
    with contextlib.redirect_stdout(sys.stderr):  # what training prints goes to stderr; the table to stdout
        rows = run(device, SMALL if args.small else FULL, set(args.skip), not args.no_compile)
    print("| section | check | result |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")


if __name__ == "__main__":
    main()
