"""The one training loop behind ``pretrain``, ``finetune`` and ``prompt-tune``.

Each step draws one task by its sampling weight (the reference's scheme), runs ``accumulation`` micro-batches
of it, clips and steps. Single-process runs use plain PyTorch; ``engine: deepspeed`` runs the same loop under
``deepspeed.initialize`` (see :mod:`uniperceiver_cli.train.engines.deepspeed`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import random
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.markup import escape

from uniperceiver_cli.checkpoints import CheckpointError, load_checkpoint, save_bundle
from uniperceiver_cli.checkpoints.runs import DEEPSPEED_DIR, STATE_FILE
from uniperceiver_cli.data.loader import make_loader
from uniperceiver_cli.data.mixing import mix_tasks
from uniperceiver_cli.evaluate.report import print_results
from uniperceiver_cli.evaluate.runners import autocast
from uniperceiver_cli.evaluate.tasks import evaluate_task
from uniperceiver_cli.model.moe import RouterStats
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.parallel.context import Context
from uniperceiver_cli.train.engines.protocol import Engine
from uniperceiver_cli.train.engines.single import SingleEngine
from uniperceiver_cli.train.losses import router_loss
from uniperceiver_cli.train.optim import freeze_for_prompt_tuning
from uniperceiver_cli.train.recipe import Recipe, TrainSpec
from uniperceiver_cli.train.tasks import TrainTask

err_console = Console(stderr=True)

LOCK_FILE = ".lock"  # held (flock) by the process training into a run directory


def build_model(recipe: Recipe) -> UniPerceiver:
    """The recipe's model, initialised from ``init`` when given. Prompt parameters that the checkpoint lacks
    start fresh; any other missing, unexpected or mis-shaped key is an error. A folded model is refused: it is
    for inference (the experts and gates training updates are merged away). Task routing routes the recipe's
    tasks (``moe.tasks``, recorded in the bundle)."""
    config = recipe.model_config()
    if config.folded:
        raise ValueError("the recipe's model has folded experts (moe.folded), and a folded model is for inference "
                         "only; train the unfolded model")
    model = UniPerceiver(config)
    if recipe.init:
        report = load_checkpoint(model, recipe.init, strict=False)
        missing = sorted(set(report.missing) - model.prompt_parameters(encoder_norms=False))
        if missing or report.unexpected or report.mismatched:
            report.missing = missing
            raise CheckpointError(f"init {recipe.init} does not fit the recipe's model: {report.summary()}")
    if recipe.stage == "prompt-tune":
        freeze_for_prompt_tuning(model)
    return model


def _rng_state() -> dict[str, Any]:
    """The global RNGs as tensors and plain values, so a checkpoint loads with ``weights_only=True``."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
             "gauss": float(gauss)}
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        numpy = ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["gauss"])
    np.random.set_state(numpy)  # a tuple in checkpoints written by older versions


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class RunLog:
    """metrics.jsonl, TensorBoard events and the console progress (main process only): a progress bar on a
    terminal; where stderr is not one (a SLURM output file, ``| tee``), one plain line per logged step."""

    def __init__(self, run_dir: Path, total: int, enabled: bool, start: int = 0) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        from torch.utils.tensorboard import SummaryWriter

        self.file = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.total, self.start, self.began = total, start, time.monotonic()
        self.progress = None
        if err_console.is_terminal:
            self.progress = Progress(TextColumn("[bold]step"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[loss]}  {task.fields[rate]} samples/s"),
                                     TimeRemainingColumn(), console=err_console)
            self.progress.start()
            self.bar = self.progress.add_task("train", total=total, completed=start, loss="", rate="")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        plain = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.file.write(json.dumps(plain, allow_nan=False) + "\n")  # standard JSON: no NaN or Infinity
        self.file.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(key, value, record["step"])

    def advance(self, record: dict[str, Any]) -> None:
        """Show a logged step: its task losses and samples/s, with the elapsed time and an estimate of the rest."""
        if not self.enabled:
            return
        step, rate = record["step"], record["samples_per_s"]
        losses = {k.removesuffix("/loss"): v for k, v in record.items() if k.endswith("/loss")}
        if self.progress is not None:
            mean = sum(losses.values()) / max(1, len(losses))
            self.progress.update(self.bar, completed=step, loss=f"mean loss of {len(losses)} task(s) {mean:.3f}",
                                 rate=f"{rate:.0f}")
            return
        elapsed = time.monotonic() - self.began
        left = elapsed / max(1, step - self.start) * (self.total - step)
        tasks = " ".join(f"{name} {value:.4f}" for name, value in losses.items())
        err_console.print(f"step {step}/{self.total}  loss {tasks}  {rate:.0f} samples/s  elapsed {_clock(elapsed)}  "
                          f"eta {_clock(left)}", markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.enabled:
            if self.progress is not None:
                self.progress.stop()
            self.file.close()
            self.writer.close()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    return sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if folder.exists() else []


def find_resume(run_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        found = [p for p in _checkpoints(run_dir) if (p / STATE_FILE).exists() or (p / DEEPSPEED_DIR).exists()]
        return found[-1] if found else None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    return path


def compute_threads(spec: TrainSpec, tasks: int, environ: Mapping[str, str] = os.environ) -> int | None:
    """``train.threads`` as a count: ``auto`` is the cores this process may use less the data-loader workers
    (``num_workers`` per task), at least one. The cores are its CPU affinity: under ``srun`` that is its task's own
    (``--cpus-per-task``); processes that share one (``torchrun``, which sets ``LOCAL_WORLD_SIZE``) split it."""
    if spec.threads != "auto":
        return spec.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sharing = environ.get("LOCAL_WORLD_SIZE", "")
    per_node = int(sharing) if sharing.isdigit() and int(sharing) > 0 else 1
    return max(1, cores // per_node - spec.num_workers * tasks)


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


class TrainingStopped(ValueError):
    """The run produced a non-finite loss, gradient or weight; the message is one line naming the step."""


class RunDirBusy(ValueError):
    """Another live process is training into the same run directory, or it cannot be made."""


@contextlib.contextmanager
def run_lock(run_dir: Path, ctx: Context) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``run_dir/.lock`` while the run lasts (main process; the others learn the
    outcome by a broadcast). The kernel drops the lock when its process dies, so a killed run leaves nothing that
    blocks ``--resume auto``; the file only records the holder's pid for the message."""
    fd, error = None, ""
    if ctx.main:
        try:
            fd, error = _lock(run_dir)
        except OSError as e:  # the folder or the lock file cannot be made: every process must hear it
            error = f"cannot use {run_dir} as a run directory: {e.strerror or e}"
    if ctx.world_size > 1:
        busy = torch.tensor([float(bool(error))], device=ctx.device)
        torch.distributed.broadcast(busy, 0)
        error = error or (f"{run_dir}: the main process cannot take it as its run directory" if busy.item() else "")
    if error:
        raise RunDirBusy(error)
    try:
        yield
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _lock(run_dir: Path) -> tuple[int | None, str]:
    """The locked file descriptor, or the reason the folder is busy."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd, ""
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return None, (f"{run_dir} is in use by another run (process {holder}); wait for it to end "
                      "or pass another --run-dir")
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        # A file system without locks (Lustre mounted without -o flock): warn and go on unguarded.
        err_console.print(f"[yellow]warning:[/yellow] cannot lock {escape(str(run_dir))} ({e.strerror}); "
                          "nothing stops a second run into it", highlight=False, soft_wrap=True)
        return None, ""


def train(recipe: Recipe, run_dir: Path, *, resume: str | None = None, ctx: Context | None = None,
          stop_after: int | None = None) -> Path:
    """Run a recipe; returns the final bundle's folder. ``stop_after`` ends early after that many steps (as if
    interrupted), leaving the checkpoints to resume from. ``train.threads`` applies only while it runs.

    Raises:
        RunDirBusy: another process is training into ``run_dir``.
        TrainingStopped: a loss, gradient norm or weight became non-finite; the last good checkpoint stays and
            no ``final/`` is written.
    """
    ctx = ctx or Context()
    with _torch_threads(compute_threads(recipe.train, len(recipe.tasks))), run_lock(run_dir, ctx):
        return _train(recipe, run_dir, resume=resume, ctx=ctx, stop_after=stop_after)


class _Window:
    """What the loop collects between two log lines, as device tensors: each micro-batch's loss and metrics (with
    its step and task) and each step's gradient norm. :meth:`check` and :meth:`means` sync with the host once."""

    def __init__(self, check_norms: bool) -> None:
        self.check_norms = check_norms  # fp16's loss scaler skips inf-gradient steps by design
        self.sums: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.losses: list[tuple[int, str, torch.Tensor]] = []  # since the last check
        self.norms: list[tuple[int, torch.Tensor]] = []
        self.samples, self.tic = 0, time.perf_counter()

    def add(self, step: int, task: str, loss: torch.Tensor, metrics: dict[str, torch.Tensor], samples: int) -> None:
        self.sums[f"{task}/loss"].append(loss.detach())
        self.losses.append((step, task, loss.detach()))
        for key, value in metrics.items():
            self.sums[f"{task}/{key}"].append(value.detach())
        self.samples += samples

    def add_router(self, step: int, stats: RouterStats, loss: torch.Tensor) -> None:
        """Token and context routing's statistics of one micro-batch (logged under moe/) and its router loss."""
        self.losses.append((step, "router", loss.detach()))
        for key, value in stats.metrics().items():
            self.sums[f"moe/{key}"].append(value.detach())

    def add_norm(self, step: int, norm: torch.Tensor) -> None:
        self.sums["grad_norm"].append(norm)
        self.norms.append((step, norm))

    def check(self, ctx: Context, run_dir: Path) -> None:
        """Stop the run at the first non-finite loss (or gradient norm) since the last check, on any process."""
        values = [loss for _, _, loss in self.losses] + [norm for _, norm in self.norms if self.check_norms]
        bad = (~torch.isfinite(torch.stack(values).float())).any().float() if values else torch.zeros(())
        if ctx.world_size > 1:
            bad = bad.to(ctx.device)
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item():
            where = next((f"step {step}: the {task} loss is {loss.item()}" for step, task, loss in self.losses
                          if not torch.isfinite(loss)), None)
            where = where or next((f"step {step}: the gradient norm is {norm.item()}" for step, norm in self.norms
                                   if not torch.isfinite(norm)), "a non-finite loss on another process")
            raise TrainingStopped(f"{where}; training stopped. {_last_good(run_dir)}")
        self.losses.clear()
        self.norms.clear()

    def record(self, ctx: Context) -> dict[str, float]:
        """The window's means over every process and its samples/s; starts the next window."""
        rate = self.samples * ctx.world_size / (time.perf_counter() - self.tic)
        means = torch.stack([_finite_mean(v) for v in self.sums.values()])
        if ctx.world_size > 1:  # the global batch's means: every process ran the same tasks on its own data
            torch.distributed.all_reduce(means)
            means /= ctx.world_size
        record = {"samples_per_s": rate, **dict(zip(self.sums, means.tolist(), strict=True))}
        self.sums.clear()
        self.samples, self.tic = 0, time.perf_counter()
        return record


@dataclass
class _Run:
    """What the parts of a run share: set up (:func:`_setup`), stepped (:func:`_loop`), saved (:func:`_finish`)."""

    recipe: Recipe
    run_dir: Path
    ctx: Context
    engine: Engine
    tasks: dict[str, TrainTask]
    loaders: dict[str, Any]
    stream: Generator[tuple[str, dict[str, Any]], None, str]
    generator: torch.Generator
    step: int  # steps done
    consumed: int  # micro-batches drawn from the stream


def _finite_mean(values: list[torch.Tensor]) -> torch.Tensor:
    """The mean of the finite values (fp16's loss scaler makes some gradient norms inf by design); nan if none."""
    v = torch.stack(values).float()
    finite = torch.isfinite(v)
    return torch.where(finite, v, 0.0).sum() / finite.sum()


def _last_good(run_dir: Path) -> str:
    found = _checkpoints(run_dir)
    if not found:
        return "No checkpoint was written; nothing to resume."
    return f"The last good checkpoint is {found[-1]} (lower train.lr and pass --resume auto to continue from it)."


def _check_weights(model: torch.nn.Module, step: int, run_dir: Path) -> None:
    """Stop on a non-finite weight. Under expert parallelism the processes hold different experts, so they agree
    first: every process stops, none waits for the others at the next collective."""
    names, params = zip(*model.named_parameters(), strict=True)
    finite = torch.stack([torch.isfinite(p).all() for p in params])
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        finite = finite.to(torch.int32)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    bad = [name for name, ok in zip(names, finite.tolist(), strict=True) if not ok]  # one host sync
    if bad:
        raise TrainingStopped(f"step {step}: {len(bad)} weight tensor(s) are not finite ({', '.join(bad[:3])}); "
                              f"training stopped. {_last_good(run_dir)}")


def _skipped(loaders: dict[str, Any], ctx: Context) -> dict[str, Counter[str]]:
    """Per task, the samples skipped so far by reason (undecodable members, unreadable shards), over every
    process."""
    local = {name: Counter(loader.skipped) for name, loader in loaders.items()}
    if ctx.world_size == 1:
        return local
    gathered: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, local)
    return {name: sum((part[name] for part in gathered), Counter()) for name in loaders}


def _train(recipe: Recipe, run_dir: Path, *, resume: str | None, ctx: Context,
           stop_after: int | None) -> Path:
    run = _setup(recipe, run_dir, resume, ctx)
    spec = recipe.train
    end = spec.steps if stop_after is None else min(spec.steps, run.step + stop_after)
    log = RunLog(run_dir, spec.steps, ctx.main, start=run.step)
    try:
        _loop(run, end, log)
        if end < spec.steps:  # stopped early (stop_after), as if interrupted: leave a checkpoint to resume from
            _save_checkpoint(run)
            return run_dir
    finally:
        log.close()
    return _finish(run)


def _setup(recipe: Recipe, run_dir: Path, resume: str | None, ctx: Context) -> _Run:
    """The model, engine, tasks and data streams; from the run's checkpoint when resuming. ``config.yaml`` is
    written only once all of them are set up, so a recipe or override that does not fit the run changes nothing."""
    if resume is None and took_a_step(run_dir):
        raise ValueError(f"{run_dir} already holds a run: pass --resume auto to continue it, or another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = recipe.train
    seed_everything(spec.seed)
    model = build_model(recipe)
    tasks = {t.name: TrainTask.build(t, Path(recipe.data_root)) for t in recipe.tasks}
    TrainTask.record_targets(model, tasks.values())  # class names, caption vocabulary: for evaluations, the bundle
    if recipe.engine.kind == "deepspeed":
        from uniperceiver_cli.train.engines.deepspeed import DeepSpeedEngine

        engine: Engine = DeepSpeedEngine(model, recipe, ctx, run_dir)
    else:
        engine = SingleEngine(model, recipe, ctx)
    checkpoint = find_resume(run_dir, resume)
    client = engine.load(checkpoint) if checkpoint is not None else {"step": 0, "consumed": 0}
    loaders = {name: make_loader(t.directory, task=t.spec.type, batch_size=t.spec.batch_size, train=True,
                                 image_size=model.config.image_size, num_frames=t.spec.num_frames,
                                 max_text_len=t.spec.max_text_len, seed=spec.seed, subset=t.spec.subset,
                                 num_workers=spec.num_workers, epochs=None, label_set=t.spec.label_set,
                                 augment=t.spec.augment, frame_stride=t.spec.frame_stride,
                                 rank=ctx.rank, world_size=ctx.world_size)
               for name, t in tasks.items()}
    stream = mix_tasks(loaders, {n: t.spec.sampling_weight for n, t in tasks.items()}, seed=spec.seed)
    run = _Run(recipe, run_dir, ctx, engine, tasks, loaders, stream, torch.Generator().manual_seed(spec.seed + 1),
               client["step"], client["consumed"])
    for _ in range(client["consumed"]):  # fast-forward the data to where the checkpoint left it
        _draw(run)
    if checkpoint is not None:
        _set_rng_state(client["rng"])
        run.generator.set_state(client["generator"])
    if ctx.main:
        config = run_dir / "config.yaml"
        config.with_suffix(".yaml.tmp").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        os.replace(config.with_suffix(".yaml.tmp"), config)
    return run


def took_a_step(run_dir: Path) -> bool:
    """Whether a run in ``run_dir`` logged a step or wrote a checkpoint or its final bundle; one that failed
    before (a recipe error at its start) leaves nothing a new run must not overwrite."""
    metrics = run_dir / "metrics.jsonl"
    return (metrics.is_file() and metrics.stat().st_size > 0) or bool(_checkpoints(run_dir)) \
        or (run_dir / "final").exists()


def _draw(run: _Run) -> tuple[str, dict[str, Any]]:
    """The next task and batch of the mix. A task whose data gives no batch at all (every shard unreadable or
    empty) ends the run in one line with its skip counts."""
    try:
        return next(run.stream)
    except StopIteration as stop:
        name = stop.value
        task = run.tasks[name]
        counts = run.loaders[name].skipped
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())) or "nothing skipped"
        raise ValueError(f"task {name}: no sample could be read from {task.directory} on this process "
                         f"({len(task.manifest.shards)} shard(s) in the split; skipped: {reasons})") from None


def _loop(run: _Run, end: int, log: RunLog) -> None:
    """Steps ``run.step + 1`` to ``end``: draw, forward, backward, step; check, log, checkpoint and evaluate."""
    spec, ctx, engine = run.recipe.train, run.ctx, run.engine
    window = _Window(check_norms=spec.precision != "fp16")
    engine.model.train()
    while run.step < end:
        run.step += 1
        step = run.step
        for _ in range(spec.accumulation):
            name, batch = _draw(run)
            run.consumed += 1
            with autocast(ctx.device, spec.precision), engine.model.router_log() as routed:
                loss, metrics = run.tasks[name].loss(engine.model, batch, run.generator)
            window.add(step, name, loss, metrics, len(batch["keys"]))
            stats = routed.stats()
            if stats is not None:  # token and context routing
                extra = router_loss(stats, spec.moe_balance_weight, spec.moe_z_weight)
                window.add_router(step, stats, extra)
                loss = loss + extra
            engine.backward(loss)
            engine.micro_step()
        norm = engine.step()
        if norm is not None:  # a device tensor, or DeepSpeed's Python float on some paths
            window.add_norm(step, torch.as_tensor(norm, dtype=torch.float32, device=ctx.device).detach())
        checkpointing = bool(spec.checkpoint_every and step % spec.checkpoint_every == 0)
        logging = step % spec.log_every == 0 or step == end
        if logging or checkpointing:
            window.check(ctx, run.run_dir)
        if logging:
            record = {"step": step, "lr": engine.lr(), **window.record(ctx),
                      **{f"{n}/skipped": sum(c.values()) for n, c in _skipped(run.loaders, ctx).items()}}
            log.write(record)
            log.advance(record)
        if checkpointing:
            _save_checkpoint(run)
        if run.recipe.evaluation.every and step % run.recipe.evaluation.every == 0 and step != spec.steps:
            model = engine.inference_model()
            if ctx.main:
                _evaluate(model, run.recipe, run.run_dir / "eval" / f"step-{step}", log, step)
            engine.model.train()


def _finish(run: _Run) -> Path:
    """The end-of-run summary of skipped samples, the final bundle and the final evaluation."""
    _check_weights(run.engine.model, run.step, run.run_dir)
    skipped = _skipped(run.loaders, run.ctx)
    final = run.run_dir / "final"
    model = run.engine.inference_model()
    if run.ctx.main:
        for name, counts in ((n, c) for n, c in skipped.items() if c):
            reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))
            err_console.print(f"[yellow]skipped while training:[/yellow] {name}: {sum(counts.values())} sample(s) "
                              f"({escape(reasons)})", highlight=False, soft_wrap=True)
        try:
            with _writing(final):
                save_bundle(model, final)
        except CheckpointWriteError as e:
            for partial in final.glob("*.tmp"):
                partial.unlink(missing_ok=True)
            raise CheckpointWriteError(f"{e}; {_last_good(run.run_dir)}") from None
        if run.recipe.evaluation.tasks:
            _evaluate(model, run.recipe, run.run_dir / "eval" / "final", None, run.recipe.train.steps)
    return final


def _save_checkpoint(run: _Run) -> None:
    """Write ``checkpoints/step-N`` (weights checked finite first) under a temporary name and rename it; keep the
    last ``keep_checkpoints``. A write that fails on any process (a full disk, a file-size limit) removes the
    partial folder and stops every process in one line; the checkpoints already written stay."""
    _check_weights(run.engine.model, run.step, run.run_dir)
    ctx, engine = run.ctx, run.engine
    folder = run.run_dir / "checkpoints"
    target, tmp = folder / f"step-{run.step:07d}", folder / f".tmp-step-{run.step:07d}"
    client = {"step": run.step, "consumed": run.consumed, "rng": _rng_state(), "generator": run.generator.get_state()}

    def prepare() -> None:
        if ctx.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    for write in (prepare, lambda: engine.save(tmp, client)):  # every process agrees after each (and waits)
        failure = ""
        try:
            with _writing(target):
                write()
        except CheckpointWriteError as e:
            failure = str(e)
        if _on_any_process(bool(failure), ctx):
            if ctx.main:
                shutil.rmtree(tmp, ignore_errors=True)
            failure = failure or f"another process could not write its part of {target}"
            raise CheckpointWriteError(f"{failure}; training stopped. {_last_good(run.run_dir)}")
    engine.barrier()
    if ctx.main:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        for old in _checkpoints(run.run_dir)[:-run.recipe.train.keep_checkpoints]:  # keep >= 1 (checked)
            shutil.rmtree(old)
    engine.barrier()


class CheckpointWriteError(OSError):
    """A checkpoint or bundle could not be written; the message is one line naming the folder and the OS error."""


@contextlib.contextmanager
def _writing(folder: Path) -> Iterator[None]:
    """Turn a failed write into :class:`CheckpointWriteError`: torch's and safetensors' writers raise their own
    errors (``RuntimeError: unexpected pos``, ``SafetensorError``), with the OSError, where they keep it, as the
    context."""
    try:
        yield
    except Exception as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, OSError) and cause.strerror:
            reason = f"[Errno {cause.errno}] {cause.strerror}"
        elif type(e).__name__ == "SafetensorError" or "unexpected pos" in str(e):  # their I/O errors, without one
            reason = " ".join(str(e).split())[:200]
        else:  # not a failed write: a bug must show as itself
            raise
        raise CheckpointWriteError(f"cannot write {folder}: {reason}") from None


def _on_any_process(flag: bool, ctx: Context) -> bool:
    """Whether ``flag`` holds on any process (one all-reduce when there are several)."""
    if ctx.world_size == 1:
        return flag
    value = torch.tensor([float(flag)], device=ctx.device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _evaluate(model: UniPerceiver, recipe: Recipe, out: Path, log: RunLog | None, step: int) -> dict[str, Any]:
    """Run the recipe's evaluation tasks. One that cannot run (labels that match no sample, a missing folder) is
    reported in one line and in summary.json; the others, and training, go on."""
    results, errors, shown = {}, {}, []
    for spec in recipe.evaluation.tasks:
        try:
            evaluation = evaluate_task(model, spec, Path(recipe.data_root), num_workers=recipe.train.num_workers)
            evaluation.write(out / spec.name, {"path": None, "note": "the model being trained"})
        except (ValueError, OSError) as e:
            errors[spec.name] = " ".join(str(e).split())
            err_console.print(f"[yellow]warning:[/yellow] evaluation {spec.name} after step {step} failed: "
                              f"{escape(errors[spec.name])}", highlight=False, soft_wrap=True)
            continue
        results[spec.name] = evaluation.result.metrics
        shown.append(evaluation.result)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"step": step, "results": results, **({"errors": errors} if errors else {})}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if log is not None:
        log.write({"step": step, **{f"eval/{n}/{k}": v for n, m in results.items() for k, v in m.items()}})
    else:
        for result in shown:
            print_results(result, f"{recipe.name}: {result.task} after {step} steps")
        Console().print(f"wrote {out / 'summary.json'}", highlight=False, soft_wrap=True)
    return results
