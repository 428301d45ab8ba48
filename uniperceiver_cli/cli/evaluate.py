"""``uniperceiver evaluate``: the papers' metrics for a model on a converted data set split."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from uniperceiver_cli.cli.common import (
    MODEL_HELP,
    USER_ERRORS,
    Vocabulary,
    complete_recipe,
    load_any_model,
    one_line_warnings,
    pick_device,
    report,
    user_errors,
)
from uniperceiver_cli.data.shards import Manifest, is_split_url
from uniperceiver_cli.task_types import TASKS
from uniperceiver_cli.train.recipe import PROMPT_LENGTHS, EvalTaskSpec

if TYPE_CHECKING:
    from uniperceiver_cli.parallel.context import Context

SPEC = {field.name: field.default for field in dataclasses.fields(EvalTaskSpec)}  # the recipes' defaults


def evaluate(
    data: str | None = typer.Option(None, "--data", help="A converted split: the folder holding manifest.json, or "
                                    "its http(s) URL (streamed with UNIPERCEIVER_STREAMING=1)."),
    suite: str | None = typer.Option(None, "--suite", help="Run a list of tasks instead: a recipe's evaluation "
                                     "tasks (a shipped name or a file) or a suite file (data_root, tasks).",
                                     autocompletion=complete_recipe),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="--suite: keep a task's results already in "
                                       "OUT for this model (same weights' sha256) and settings."),
    model: Path | None = typer.Option(None, "--model", help=MODEL_HELP),
    preset: str | None = typer.Option(None, help="Model preset: the shape of an official file, or a fresh model."),
    task: str | None = typer.Option(None, help=f"One of {', '.join(TASKS)}; default: the split's first task."),
    labels: Path | None = typer.Option(None, help="Zero-shot class names, one per line (default: the split's)."),
    label_set: str | None = typer.Option(None, help="Which of the split's label sets to score (e.g. colour)."),
    templates: Path | None = typer.Option(None, help="Prompt templates, one per line, with {} for the name."),
    out: Path | None = typer.Option(None, help="Output folder (default: eval/<dataset>-<split>-<task>; with --suite "
                                    "eval/<suite>, a folder per task and summary.csv)."),
    batch_size: int = typer.Option(SPEC["batch_size"], min=1),
    beam_size: int = typer.Option(SPEC["beam_size"], min=1, help="Caption beam width (1 = greedy)."),
    max_len: int = typer.Option(SPEC["max_len"], min=1, help="Longest generated caption, in tokens."),
    len_penalty: float = typer.Option(0.0, min=0.0, help="Rank finished beams by score / (length + 1) ** this."),
    vocabulary: Vocabulary = typer.Option(
        Vocabulary.trained, help="Captioning: decode over the tokens the model's caption task trained on (trained; all "
        "when the bundle records none) or all 49,411 (full)."),
    vocabulary_from: list[Path] | None = typer.Option(None, help="Captioning (and MLM): decode (score) only over "
                                                      "the tokens of this split's texts (repeatable)."),
    max_text_len: int | None = typer.Option(None, min=2, help="Retrieval: cut captions to this many tokens (default "
                                            "50); text classification and VQA: prompts, around their slot (default "
                                            f"{PROMPT_LENGTHS['text_classification']} and {PROMPT_LENGTHS['vqa']})."),
    captions_per_item: int | None = typer.Option(None, min=1, help="Retrieval: use only each item's first N."),
    num_frames: int = typer.Option(SPEC["num_frames"], min=1, help="Frames per video clip."),
    frame_stride: float = typer.Option(SPEC["frame_stride"], min=0.01, help="Source frames between "
                                       "sampled frames at 30 fps, scaled by the video's fps (ToyWorld: 3.75)."),
    views: int = typer.Option(SPEC["views"], min=1, help="Spatial views per video, 1 or 3 (softmax averaged)."),
    clips: int = typer.Option(SPEC["clips"], min=1, help="Temporal clips per video (the reference's K400: 4)."),
    limit: int | None = typer.Option(None, min=1, help="Evaluate about this many samples only."),
    workers: int = typer.Option(0, min=0, help="Data-loader worker processes."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N] (under torchrun: each process's GPU)."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU), fp32, bf16 or fp16."),
    routing_task: str | None = typer.Option(None, "--routing-task", help="Task-routed MoE models: the training "
                                            "task whose experts to use (default: the task type's name)."),
) -> None:
    """Evaluate a model on one task of a converted split (results.json, predictions.jsonl), or on a suite of tasks
    (--suite: one folder per task and summary.csv). Under torchrun each process evaluates its share of the split
    and the metrics are those of the whole split."""
    from uniperceiver_cli.checkpoints.sources import model_identity
    from uniperceiver_cli.evaluate.report import print_results
    from uniperceiver_cli.evaluate.tasks import evaluate_task
    from uniperceiver_cli.text_files import read_lines

    with user_errors(), one_line_warnings():
        if suite is not None:
            given = {"--data": data, "--task": task, "--labels": labels, "--label-set": label_set,
                     "--templates": templates, "--vocabulary-from": vocabulary_from, "--routing-task": routing_task,
                     "--captions-per-item": captions_per_item, "--limit": limit}
            given.update({f"--{k.replace('_', '-')}": v for k, v in (
                ("batch_size", batch_size), ("beam_size", beam_size), ("max_len", max_len), ("num_frames", num_frames),
                ("frame_stride", frame_stride), ("views", views), ("clips", clips)) if v != SPEC[k]})
            given["--max-text-len"] = max_text_len
            given["--vocabulary"] = None if vocabulary is Vocabulary.trained else vocabulary
            clash = [name for name, value in given.items() if value]
            if clash:
                raise ValueError(f"with --suite each task's settings come from the suite; drop {', '.join(clash)}")
            _run_suite(suite, model, preset, out, skip_existing, workers, device, precision, len_penalty)
            return
        if skip_existing:
            raise ValueError("--skip-existing goes with --suite")
        if data is None:
            raise ValueError("give --data SPLIT (one task) or --suite RECIPE|FILE (a list of tasks)")
        source = data if is_split_url(data) else Path(data)
        manifest = Manifest.load(source)
        task = task or manifest.tasks[0]
        if task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
        if task not in manifest.tasks:
            raise ValueError(f"{data} serves {', '.join(manifest.tasks)}, not {task}")
        if vocabulary_from and vocabulary is Vocabulary.full:
            raise ValueError("--vocabulary full and --vocabulary-from contradict each other: give one")
        template_list = read_lines(templates, "templates") if templates else None
        spec = EvalTaskSpec(name=routing_task or task, type=task,
                            data=data if isinstance(source, str) else str(source.resolve()))
        vars(spec).update(  # the options as they are: the loader and the runners check them, as for a recipe
            batch_size=batch_size, label_set=label_set, labels=labels and str(labels), templates=template_list,
            max_samples=limit, beam_size=beam_size, max_len=max_len, vocabulary=vocabulary.value,
            vocabulary_from=[str(f) for f in vocabulary_from or []],
            max_text_len=max_text_len or spec.max_text_len,
            captions_per_item=captions_per_item, num_frames=num_frames, frame_stride=frame_stride, views=views,
            clips=clips)
        ctx = _context(device)
        net = load_any_model(model, preset, ctx.device)
        evaluation = evaluate_task(net, spec, num_workers=workers, precision=precision, len_penalty=len_penalty,
                                   ctx=ctx, progress=True)
        if not ctx.main:
            return
        result, skipped = evaluation.result, evaluation.data["skipped"]
        if skipped:
            result.notes.append("skipped while loading: " + ", ".join(f"{k}: {v}" for k, v in skipped.items()))
        out = out or Path("eval") / f"{manifest.dataset}-{manifest.split}-{task}"
        settings = {"batch_size": batch_size, "beam_size": beam_size, "max_len": max_len, "len_penalty": len_penalty,
                    "views": views, "clips": clips, "num_frames": num_frames, "frame_stride": frame_stride,
                    "label_set": label_set, "templates": template_list, "vocabulary": vocabulary.value,
                    "vocabulary_from": spec.vocabulary_from, "labels": evaluation.labels, "precision": precision,
                    "device": str(ctx.device), "limit": limit, "max_text_len": spec.max_text_len}
        path = evaluation.write(out, model_identity(model), settings)
    print_results(result, f"{manifest.dataset}/{manifest.split} - {task}")
    typer.echo(f"wrote {path}")


def _context(device: str) -> Context:
    """This process's place: under torchrun (``RANK`` and ``WORLD_SIZE`` set, several processes) torch.distributed is
    started and each process takes its GPU; otherwise one process on ``device``."""
    from uniperceiver_cli.parallel.context import Context, init_distributed

    if os.environ.get("RANK") is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return init_distributed(pick_device(device))
    return Context(device=pick_device(device))


def _run_suite(name: str, model: Path | None, preset: str | None, out: Path | None, skip_existing: bool,
               workers: int, device: str, precision: str, len_penalty: float) -> None:
    """Each task of the suite into OUT/<task>/, then OUT/summary.csv and a table; a task that fails is reported in
    one line and the others go on (exit code 1), except under several processes, where it ends them all."""
    from uniperceiver_cli.checkpoints.sources import model_identity
    from uniperceiver_cli.evaluate.gather import gather
    from uniperceiver_cli.evaluate.suite import existing_result, print_summary, read_result, summary_rows, write_summary
    from uniperceiver_cli.evaluate.tasks import evaluate_task
    from uniperceiver_cli.train.catalogue import load_suite_checked

    tasks = load_suite_checked(name)
    out = out or Path("eval") / Path(name).stem
    ctx = _context(device)
    net = load_any_model(model, preset, ctx.device)
    identity = model_identity(model) if ctx.main else {}
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    root = str(Path(tasks.data_root).resolve())
    for spec in tasks.tasks:
        settings = {**dataclasses.asdict(spec), "data_root": root, "precision": precision, "len_penalty": len_penalty}
        kept = existing_result(out / spec.name, identity, settings) if skip_existing and ctx.main else None
        kept = gather(kept, ctx)[0]  # the main process decides for all
        if kept is not None:
            results[spec.name] = kept
            continue
        try:
            evaluation = evaluate_task(net, spec, Path(tasks.data_root), num_workers=workers, precision=precision,
                                       len_penalty=len_penalty, ctx=ctx, progress=True)
        except USER_ERRORS as e:
            if ctx.world_size > 1:  # the processes may not have failed alike: stop them all (torchrun does)
                raise
            errors[spec.name] = " ".join(str(e).split())
            report(f"{spec.name}: {errors[spec.name]}")
            continue
        if ctx.main:
            results[spec.name] = read_result(evaluation.write(out / spec.name, identity, settings), "evaluated")
    if not ctx.main:
        return
    rows = summary_rows(tasks.tasks, results, errors, identity)
    path = write_summary(out, rows)
    print_summary(rows, f"{name}: {len(results)} of {len(tasks.tasks)} tasks")
    typer.echo(f"wrote {path}")
    if errors:
        raise typer.Exit(1)
