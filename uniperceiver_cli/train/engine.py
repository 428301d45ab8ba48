"""The one training loop behind ``pretrain``, ``finetune`` and ``prompt-tune``.

Each step draws one task by its sampling weight (the reference's scheme), runs ``accumulation`` micro-batches
of it, clips and steps. Single-process runs use plain PyTorch; ``engine: deepspeed`` runs the same loop under
``deepspeed.initialize`` (see :mod:`uniperceiver_cli.train.deepspeed_engine`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from uniperceiver_cli.checkpoints import CheckpointError, load_checkpoint, save_bundle
from uniperceiver_cli.data.loader import make_loader
from uniperceiver_cli.data.mixing import mix_tasks
from uniperceiver_cli.model.config import get_config
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.train.evaluation import evaluate_task, print_summary
from uniperceiver_cli.train.optim import build_optimizer, build_scheduler, freeze_for_prompt_tuning, prompt_parameter
from uniperceiver_cli.train.recipe import Recipe
from uniperceiver_cli.train.tasks import TrainTask

STATE_FILE = "state.pt"


@dataclass
class Context:
    """Where this process sits: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def build_model(recipe: Recipe) -> UniPerceiver:
    """The recipe's model, initialised from ``init`` when given. Prompt parameters that the checkpoint lacks
    start fresh; any other missing, unexpected or mis-shaped key is an error."""
    model = UniPerceiver(get_config(recipe.model.preset, **recipe.model.overrides))
    if recipe.init:
        report = load_checkpoint(model, recipe.init, strict=False)
        missing = [k for k in report.missing if not prompt_parameter(k) or ".norm" in k or "embed_norm" in k]
        if missing or report.unexpected or report.mismatched:
            report.missing = missing
            raise CheckpointError(f"init {recipe.init} does not fit the recipe's model: {report.summary()}")
    if recipe.stage == "prompt-tune":
        freeze_for_prompt_tuning(model)
    return model


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


class SingleEngine:
    """Plain PyTorch: backward, then clip, step the optimizer and the schedule at each step's end.

    A step looks the word table up several times (texts, each sequence's <|spe|>, target vocabularies). With
    dense gradients every lookup's backward writes a whole vocab_size x width table; here the lookups give
    sparse gradients, added once per step into a kept dense buffer before clipping, and AdamW steps the table
    densely as the reference does. On 2 CPU cores the tiny model's steps get 1.07-1.35x faster
    (benchmarks/train_steps.py).
    """

    def __init__(self, model: UniPerceiver, recipe: Recipe, ctx: Context) -> None:
        self.model = model.to(ctx.device)
        self.model.text_embed.word.sparse = True
        self._word_grad: torch.Tensor | None = None
        self.spec = recipe.train
        self.optimizer = build_optimizer(model, recipe.train)
        self.scheduler = build_scheduler(self.optimizer, recipe.train)
        fp16 = recipe.train.precision == "fp16" and ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(ctx.device.type, init_scale=2.0**13, growth_interval=200, enabled=fp16)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.spec.accumulation).backward()

    def micro_step(self) -> None:
        """Called after each micro-batch; the plain engine steps only at the end of the step."""

    def _densify_word_grad(self) -> None:
        weight = self.model.text_embed.word.weight
        if weight.grad is None or not weight.grad.is_sparse:
            return
        if self._word_grad is None:
            self._word_grad = torch.zeros_like(weight)
        else:
            self._word_grad.zero_()
        weight.grad = self._word_grad.add_(weight.grad)

    def step(self) -> torch.Tensor:
        self._densify_word_grad()
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.spec.grad_clip if self.spec.grad_clip > 0 else float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def barrier(self) -> None:
        """Nothing to wait for in one process."""

    def save(self, directory: Path, client: dict[str, Any]) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), **client}
        torch.save(state, directory / STATE_FILE)

    def load(self, directory: Path) -> dict[str, Any]:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.scheduler.load_state_dict(state.pop("scheduler"))
        self.scaler.load_state_dict(state.pop("scaler"))
        return state


class RunLog:
    """metrics.jsonl, TensorBoard events and the console progress line (main process only)."""

    def __init__(self, run_dir: Path, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115 - closed in close()
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]{task.fields[task]}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}  {task.fields[rate]} samples/s"),
                                     TimeRemainingColumn())
            self.progress.start()
            self.bar = self.progress.add_task("train", total=total, task="", loss="", rate="")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(key, value, step)

    def advance(self, step: int, task: str, loss: str, rate: str) -> None:
        if self.progress is not None:
            self.progress.update(self.bar, completed=step, task=task, loss=loss, rate=rate)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
            self.file.close()
            self.writer.close()


def _checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    return sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if folder.exists() else []


def find_resume(run_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        found = [p for p in _checkpoints(run_dir) if (p / STATE_FILE).exists() or (p / "deepspeed").exists()]
        return found[-1] if found else None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    return path


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch compute threads (None: leave the setting), then restore it."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(recipe: Recipe, run_dir: Path, *, resume: str | None = None, ctx: Context | None = None,
          stop_after: int | None = None) -> Path:
    """Run a recipe; returns the final bundle's folder. ``stop_after`` ends early after that many steps (as if
    interrupted), leaving the checkpoints to resume from. ``train.threads`` applies only while it runs."""
    with _torch_threads(recipe.train.threads):
        return _train(recipe, run_dir, resume=resume, ctx=ctx, stop_after=stop_after)


def _train(recipe: Recipe, run_dir: Path, *, resume: str | None, ctx: Context | None,
           stop_after: int | None) -> Path:
    ctx = ctx or Context()
    if resume is None and (run_dir / "metrics.jsonl").exists():
        raise ValueError(f"{run_dir} already holds a run: pass --resume auto to continue it, or another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = recipe.train
    data_root = Path(recipe.data_root)
    if ctx.main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    seed_everything(spec.seed)
    model = build_model(recipe)
    tasks = {t.name: TrainTask.build(t, data_root) for t in recipe.tasks}
    if recipe.engine.kind == "deepspeed":
        from uniperceiver_cli.train.deepspeed_engine import DeepSpeedEngine

        engine = DeepSpeedEngine(model, recipe, ctx)
    else:
        engine = SingleEngine(model, recipe, ctx)
    start, consumed = 0, 0
    checkpoint = find_resume(run_dir, resume)
    client: dict[str, Any] = {}
    if checkpoint is not None:
        client = engine.load(checkpoint)
        start, consumed = client["step"], client["consumed"]
    loaders = {name: make_loader(t.directory, task=t.spec.type, batch_size=t.spec.batch_size, train=True,
                                 image_size=model.config.image_size, num_frames=t.spec.num_frames,
                                 max_text_len=t.spec.max_text_len, seed=spec.seed, subset=t.spec.subset,
                                 num_workers=spec.num_workers, epochs=None, label_set=t.spec.label_set,
                                 augment=t.spec.augment, frame_stride=t.spec.frame_stride,
                                 rank=ctx.rank, world_size=ctx.world_size)
               for name, t in tasks.items()}
    stream = mix_tasks(loaders, {n: t.spec.sampling_weight for n, t in tasks.items()}, seed=spec.seed)
    for _ in range(consumed):  # fast-forward the data to where the checkpoint left it
        next(stream)
    if client:
        _set_rng_state(client["rng"])
    generator = torch.Generator().manual_seed(spec.seed + 1)
    if client:
        generator.set_state(client["generator"])
    log = RunLog(run_dir, spec.steps, ctx.main)
    sums: dict[str, list[torch.Tensor]] = defaultdict(list)
    samples, tic = 0, time.perf_counter()
    end = spec.steps if stop_after is None else min(spec.steps, start + stop_after)
    model.train()
    try:
        for step in range(start + 1, end + 1):
            for _ in range(spec.accumulation):
                name, batch = next(stream)
                consumed += 1
                with autocast(spec.precision, ctx.device):
                    loss, metrics = tasks[name].loss(engine.model, batch, generator)
                engine.backward(loss)
                engine.micro_step()
                sums[f"{name}/loss"].append(loss.detach())
                for key, value in metrics.items():
                    sums[f"{name}/{key}"].append(value.detach())
                samples += len(batch["keys"])
            engine.step()
            if step % spec.log_every == 0 or step == end:
                rate = samples * ctx.world_size / (time.perf_counter() - tic)
                means = torch.stack([torch.stack(v).float().mean() for v in sums.values()])
                if ctx.world_size > 1:  # the global batch's means: every process ran the same tasks on its own data
                    torch.distributed.all_reduce(means)
                    means /= ctx.world_size
                record = {"step": step, "lr": engine.lr(), "samples_per_s": rate,
                          **dict(zip(sums, means.tolist(), strict=True))}
                log.write(record)
                losses = [v for k, v in record.items() if k.endswith("/loss")]
                log.advance(step, name, f"{sum(losses) / max(1, len(losses)):.3f}", f"{rate:.0f}")
                sums.clear()
                samples, tic = 0, time.perf_counter()
            if spec.checkpoint_every and step % spec.checkpoint_every == 0:
                _save_checkpoint(engine, run_dir, step, consumed, generator, spec.keep_checkpoints, ctx)
            if recipe.evaluation.every and step % recipe.evaluation.every == 0 and step != spec.steps and ctx.main:
                _evaluate(engine.model, recipe, run_dir / "eval" / f"step-{step}", log, step)
                model.train()
        if stop_after is not None and end < spec.steps:
            _save_checkpoint(engine, run_dir, end, consumed, generator, spec.keep_checkpoints, ctx)
            return run_dir
    finally:
        log.close()
    final = run_dir / "final"
    if ctx.main:
        save_bundle(engine.model, final)
        if recipe.evaluation.tasks:
            _evaluate(engine.model, recipe, run_dir / "eval" / "final", None, spec.steps)
    return final


def _save_checkpoint(engine: Any, run_dir: Path, step: int, consumed: int, generator: torch.Generator,
                     keep: int, ctx: Context) -> None:
    """Write ``checkpoints/step-N`` under a temporary name and rename it; keep the last ``keep``."""
    folder = run_dir / "checkpoints"
    target, tmp = folder / f"step-{step:07d}", folder / f".tmp-step-{step:07d}"
    if ctx.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.barrier()
    client = {"step": step, "consumed": consumed, "rng": _rng_state(), "generator": generator.get_state()}
    engine.save(tmp, client)
    engine.barrier()
    if ctx.main:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        for old in _checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    engine.barrier()


def _evaluate(model: UniPerceiver, recipe: Recipe, out: Path, log: RunLog | None, step: int) -> dict[str, Any]:
    results = {}
    for spec in recipe.evaluation.tasks:
        result = evaluate_task(model, spec, Path(recipe.data_root), out, recipe.train.num_workers)
        results[spec.name] = result.metrics
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"step": step, "results": results}, indent=2) + "\n")
    if log is not None:
        log.write({"step": step, **{f"eval/{n}/{k}": v for n, m in results.items() for k, v in m.items()}})
    else:
        print_summary(results, f"{recipe.name}: evaluation after {step} steps ({out / 'summary.json'})")
    return results
