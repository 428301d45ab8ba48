"""The one training loop behind ``pretrain``, ``finetune`` and ``prompt-tune``.

Each step draws one task by its sampling weight (the reference's scheme), runs ``accumulation`` micro-batches
of it, clips and steps. Single-process runs use plain PyTorch; ``engine: deepspeed`` runs the same loop under
``deepspeed.initialize`` (see :mod:`uniperceiver_cli.train.engines.deepspeed`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.markup import escape

from uniperceiver_cli.checkpoints.errors import CheckpointError
from uniperceiver_cli.checkpoints.loading import load_checkpoint
from uniperceiver_cli.checkpoints.runs import CONFIG_FILE, EVAL_DIR, FINAL_DIR, write_model_config
from uniperceiver_cli.data.loader import make_loader
from uniperceiver_cli.data.mixing import mix_tasks
from uniperceiver_cli.evaluate.report import print_results
from uniperceiver_cli.evaluate.tasks import evaluate_task
from uniperceiver_cli.model.precision import autocast
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.parallel.context import Context, on_any_process, waiting_group
from uniperceiver_cli.parallel.targets import TargetSplit
from uniperceiver_cli.text_files import shown
from uniperceiver_cli.train.checkpointing import (
    check_complete,
    check_shared,
    check_weights,
    err_console,
    find_resume,
    process_state,
    rank_seed,
    restore_rng,
    run_lock,
    save_checkpoint,
    save_final,
    seed_everything,
    took_a_step,
)
from uniperceiver_cli.train.engines.protocol import Engine
from uniperceiver_cli.train.engines.single import SingleEngine
from uniperceiver_cli.train.flops import peak_flops, step_flops
from uniperceiver_cli.train.losses import router_loss
from uniperceiver_cli.train.optim import freeze_for_prompt_tuning
from uniperceiver_cli.train.recipe import Recipe, TrainSpec
from uniperceiver_cli.train.run_log import RunLog, Window
from uniperceiver_cli.train.tasks import TrainTask
from uniperceiver_cli.train.trackers import check_available

TEXT_MULTIPLE = 8  # a compiled model's text lengths: multiples of 8 tokens


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
    model.activation_checkpointing = recipe.train.activation_checkpointing
    if recipe.init:
        report = load_checkpoint(model, recipe.init, strict=False)
        missing = sorted(set(report.missing) - model.prompt_parameters(encoder_norms=False))
        if missing or report.unexpected or report.mismatched:
            report.missing = missing
            raise CheckpointError(f"init {recipe.init} does not fit the recipe's model: {report.summary()}")
    if recipe.stage == "prompt-tune":
        freeze_for_prompt_tuning(model)
    if recipe.train.compile:
        model.compile_blocks()
    return model


def compute_threads(spec: TrainSpec, environ: Mapping[str, str] = os.environ) -> int | None:
    """``train.threads`` as a count: ``auto`` is the cores this process may use less its data-loader workers
    (``num_workers``), at least one. The cores are its CPU affinity: under ``srun`` that is its task's own
    (``--cpus-per-task``); processes that share one (``torchrun``, which sets ``LOCAL_WORLD_SIZE``) split it."""
    if spec.threads != "auto":
        return spec.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sharing = environ.get("LOCAL_WORLD_SIZE", "")
    per_node = int(sharing) if sharing.isdigit() and int(sharing) > 0 else 1
    return max(1, cores // per_node - spec.num_workers)


def share_workers(budget: int, weights: Mapping[str, float]) -> dict[str, int]:
    """The process's ``budget`` of data-loader workers shared by its tasks: evenly, the rest one each to the tasks
    drawn most often (ties: the recipe's order). A task with none decodes in the training process."""
    names = [name for name in weights if weights[name] > 0]  # a task of weight 0 is never drawn
    share = dict.fromkeys(weights, 0)
    for i, name in enumerate(sorted(names, key=lambda n: -weights[n])):
        share[name] = budget // len(names) + (i < budget % len(names))
    return share


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
    interrupted), leaving the checkpoints to resume from. ``train.threads`` applies only while it runs.

    Raises:
        RunDirBusy: another process is training into ``run_dir``.
        TrainingStopped: a loss, gradient norm or weight became non-finite; the last good checkpoint stays and
            no ``final/`` is written.
    """
    ctx = ctx or Context()
    with _torch_threads(compute_threads(recipe.train)), _tf32(recipe.train.tf32 and ctx.device.type == "cuda"), \
            run_lock(run_dir, ctx):
        return _train(recipe, run_dir, resume=resume, ctx=ctx, stop_after=stop_after)


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """CUDA float32 matmuls and convolutions in TensorFloat-32 while the run lasts (``train.tf32``), through the
    settings every torch version has and torch.compile reads (setting torch 2.9's ``fp32_precision`` alone leaves
    them unreadable: "a mix of the legacy and new APIs")."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    if enabled:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


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
    waiting: Any = None  # the group in which the other processes wait for the main process's evaluation


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
    if ctx.main:
        check_available(recipe.train.report_to)  # before the data and model are set up
    run = _setup(recipe, run_dir, resume, ctx)
    spec = recipe.train
    end = spec.steps if stop_after is None else min(spec.steps, run.step + stop_after)
    log = RunLog(run_dir, spec.steps, ctx.main, start=run.step, report_to=spec.report_to, config=recipe.to_dict())
    try:
        _loop(run, end, log)
        if end < spec.steps:  # stopped early (stop_after), as if interrupted: leave a checkpoint to resume from
            save_checkpoint(run.engine, ctx, run_dir, run.step, run.consumed, run.generator, spec.keep_checkpoints,
                            _positions(run))
            return run_dir
    finally:
        log.close()
    return _finish(run)


def _setup(recipe: Recipe, run_dir: Path, resume: str | None, ctx: Context) -> _Run:
    """The model, engine, tasks and data streams; from the run's checkpoint when resuming. ``config.yaml`` is
    written only once all of them are set up, so a recipe or override that does not fit the run changes nothing."""
    run_dir.mkdir(parents=True, exist_ok=True)
    check_shared(run_dir, ctx)  # first: what follows is decided by each process alone
    if resume is None and took_a_step(run_dir):
        raise ValueError(f"{run_dir} already holds a run: pass --resume auto to continue it, or another --run-dir")
    spec = recipe.train
    seed_everything(spec.seed)  # the same initial weights on every process
    model = build_model(recipe)
    split = TargetSplit(ctx.rank, ctx.world_size, spec.split_targets) if ctx.world_size > 1 and spec.split_targets \
        else None
    tasks = {t.name: TrainTask.build(t, Path(recipe.data_root), split, (ctx.rank, ctx.world_size))
             for t in recipe.tasks}
    TrainTask.record_targets(model, tasks.values())  # class names, caption vocabulary: for evaluations, the bundle
    seed = rank_seed(spec.seed, ctx.rank)  # drop path, gate noise and masking differ per process
    seed_everything(seed)
    if recipe.engine.kind == "deepspeed":
        from uniperceiver_cli.train.engines.deepspeed import DeepSpeedEngine

        engine: Engine = DeepSpeedEngine(model, recipe, ctx, run_dir)
    else:
        engine = SingleEngine(model, recipe, ctx)
    checkpoint = find_resume(run_dir, resume)
    check_complete(checkpoint, ctx)
    client = engine.load(checkpoint) if checkpoint is not None else {"step": 0, "consumed": 0}
    workers = share_workers(spec.num_workers, {n: t.spec.sampling_weight for n, t in tasks.items()})
    loaders = {name: make_loader(t.directory, task=t.spec.type, batch_size=t.spec.batch_size, train=True,
                                 image_size=model.config.image_size, num_frames=t.spec.num_frames,
                                 max_text_len=t.spec.max_text_len, seed=spec.seed, subset=t.spec.subset,
                                 num_workers=workers[name], epochs=None, label_set=t.spec.label_set,
                                 augment=t.spec.augment, frame_stride=t.spec.frame_stride,
                                 rank=ctx.rank, world_size=ctx.world_size, pin_memory=ctx.device.type == "cuda",
                                 text_multiple=TEXT_MULTIPLE if spec.compile else 1, answers=t.answers,
                                 subset_by=t.spec.subset_by)
               for name, t in tasks.items()}
    generator = torch.Generator().manual_seed(seed + 1)
    state = _restore(checkpoint, client, ctx, loaders, generator, spec.accumulation)
    data = state.get("data")
    stream = mix_tasks(loaders, {n: t.spec.sampling_weight for n, t in tasks.items()}, seed=spec.seed,
                       skip=client["consumed"] if data is not None else 0)
    run = _Run(recipe, run_dir, ctx, engine, tasks, loaders, stream, generator, client["step"], client["consumed"])
    if recipe.evaluation.every and recipe.evaluation.tasks:
        run.waiting = waiting_group(ctx, timedelta(minutes=recipe.evaluation.timeout_minutes))
    if checkpoint is not None and data is None:  # an older version's: draw and decode its batches again
        for _ in range(client["consumed"]):
            _draw(run)
        restore_rng(state, ctx, generator)  # as it was after them
    if ctx.main:
        config = run_dir / CONFIG_FILE
        config.with_suffix(".yaml.tmp").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        os.replace(config.with_suffix(".yaml.tmp"), config)
        write_model_config(run_dir, model.config)
    return run


def _restore(checkpoint: Path | None, client: dict[str, Any], ctx: Context, loaders: dict[str, Any],
             generator: torch.Generator, accumulation: int) -> dict[str, Any]:
    """Give this process what ``checkpoint`` kept of it (returned; empty without one): its random state, and its
    loaders' data positions (``data``; older checkpoints keep none). Every process agrees first: a part one of them
    cannot take stops all."""
    if checkpoint is None:
        return {}
    error, state = "", {}
    try:
        if client["consumed"] != client["step"] * accumulation:
            raise ValueError(f"it consumed {client['consumed']} batches in {client['step']} steps: resume with the "
                             "train.accumulation it was written with")
        state = process_state(checkpoint, client, ctx)
        for name, position in (state.get("data") or {}).items():
            if name not in loaders:
                raise ValueError(f"it holds the data position of a task {shown(name)} this recipe lacks")
            loaders[name].restore(position)
        restore_rng(state, ctx, generator)
    except (CheckpointError, ValueError, KeyError, TypeError, AttributeError, FileNotFoundError) as e:
        error = str(e) if str(e).startswith("cannot resume") else f"cannot resume from {checkpoint}: {e}"
    if on_any_process(bool(error), ctx):
        raise CheckpointError(error or f"cannot resume from {checkpoint}: another process could not take its part")
    return state


def _positions(run: _Run) -> dict[str, Any]:
    """Where each task's loader stands, for the checkpoint (:meth:`ShardLoader.state`)."""
    return {name: loader.state() for name, loader in run.loaders.items()}


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
    cuda = ctx.device.type == "cuda"
    peak = peak_flops(torch.cuda.get_device_name(ctx.device), spec.precision, spec.tf32) if cuda else None
    window = Window(check_norms=spec.precision != "fp16", peak_flops=peak)
    engine.model.train()
    while run.step < end:
        run.step += 1
        step = run.step
        for _ in range(spec.accumulation):
            name, batch = _draw(run)
            run.consumed += 1
            micro_step(engine, run.tasks[name], batch, window, step, run.generator, spec, ctx.device)
        optimizer_step(engine, window, step, ctx.device)
        checkpointing = bool(spec.checkpoint_every and step % spec.checkpoint_every == 0)
        logging = step % spec.log_every == 0 or step == end
        if logging or checkpointing:
            window.check(ctx, run.run_dir)
        if logging:
            record = {"step": step, "lr": engine.lr(), **window.record(ctx),
                      **{f"{n}/skipped": sum(c.values()) for n, c in _skipped(run.loaders, ctx).items()}}
            if cuda:  # the allocator's count on the host: no device sync
                record["max_memory_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
            log.write(record)
            log.advance(record)
        if checkpointing:
            save_checkpoint(engine, ctx, run.run_dir, step, run.consumed, run.generator, spec.keep_checkpoints,
                            _positions(run))
        if run.recipe.evaluation.every and step % run.recipe.evaluation.every == 0 and step != spec.steps:
            model = engine.inference_model()
            if ctx.main:
                _evaluate(model, run.recipe, run.run_dir / EVAL_DIR / f"step-{step}", log, step)
            if run.waiting is not None:  # the others wait here, not in the next step's collectives
                torch.distributed.barrier(group=run.waiting)
            engine.model.train()


def micro_step(engine: Engine, task: TrainTask, batch: dict[str, Any], window: Window, step: int,
               generator: torch.Generator, spec: TrainSpec, device: torch.device) -> None:
    """One micro-batch of ``task``: forward, loss (with the router loss of token and context routing), backward;
    the loss and metrics stay on the device in ``window``."""
    with autocast(device, spec.precision), engine.model.router_log() as routed:
        loss, metrics = task.loss(engine.model, batch, generator)
    window.add(step, task.spec.name, loss, metrics, len(batch["keys"]))
    window.add_flops(step_flops(engine.model.config, task.shape))
    stats = routed.stats()
    if stats is not None:  # token and context routing
        extra = router_loss(stats, spec.moe_balance_weight, spec.moe_z_weight)
        window.add_router(step, stats, extra)
        loss = loss + extra
    engine.backward(loss)
    engine.micro_step()


def optimizer_step(engine: Engine, window: Window, step: int, device: torch.device) -> None:
    """The step after the micro-batches; the gradient norm stays on the device in ``window``."""
    norm = engine.step()
    if norm is not None:  # a device tensor, or DeepSpeed's Python float on some paths
        window.add_norm(step, torch.as_tensor(norm, dtype=torch.float32, device=device).detach())


def _finish(run: _Run) -> Path:
    """The end-of-run summary of skipped samples, the final bundle and the final evaluation."""
    check_weights(run.engine.model, run.step, run.run_dir)
    skipped = _skipped(run.loaders, run.ctx)
    final = run.run_dir / FINAL_DIR
    model = run.engine.inference_model()
    if run.ctx.main:
        for name, counts in ((n, c) for n, c in skipped.items() if c):
            reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))
            err_console.print(f"[yellow]skipped while training:[/yellow] {name}: {sum(counts.values())} sample(s) "
                              f"({escape(reasons)})", highlight=False, soft_wrap=True)
        save_final(model, final, run.run_dir)
        if run.recipe.evaluation.tasks:
            _evaluate(model, run.recipe, run.run_dir / EVAL_DIR / FINAL_DIR, None, run.recipe.train.steps)
    return final


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
