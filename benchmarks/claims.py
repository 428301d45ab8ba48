"""`make claims`: the two papers' claims tested on ToyWorld, written to docs/claims.md (issue 25's protocol).

    python benchmarks/claims.py                      # every run (2 h 50 min on 2 cores, 2 h 40 min after
                                                     # `make demo`), then the page
    python benchmarks/claims.py --runs-only          # the runs, no page (resumable: done runs are kept)
    python benchmarks/claims.py --report-only        # the page from the runs already done

1. Tuning, compute-matched: prompt tuning on 1% (drawn as the reference draws it) and fine-tuning on all at the
   same steps, batch, warm-up and the reference's clipping, each at the better of two learning rates chosen on the
   validation split, then 3 seeds (new subsets) each and a deeper prompt as the capacity control; on tasks
   pre-training saw (image captioning, motion: the COCO and Kinetics analogues) and on unseen ones (video
   captioning and retrieval: MSVD's). The share of fine-tuning's gain, with a bootstrap interval over test samples
   and seeds, against the paper's share on the analogue.
2. Dense against attribute MoE, 5 seeds an arm; primary metrics declared in advance (those attribute routing can
   separate), Welch's test with Holm's correction; the reference's gradient-conflict measure on both models.
3. Routing levels, 3 seeds each, attribute against every other level on the trained and zero-shot means, Welch and
   Holm; the compute of each level noted.

Verdicts (benchmarks/claim_stats.py, tested in tests/test_claim_stats.py): "agrees", "does not agree (significant)",
"not resolved at this power" with the difference the test would detect, and for prompt tuning that memorizes its 1%
"not reproduced at this scale" with that evidence. Every run is a `uniperceiver` command, run
in turn; a run whose results exist is not run again, so an interrupted `make claims` resumes where it stopped.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import claim_stats  # beside this file, in benchmarks/
import interference
import numpy as np
import yaml

from uniperceiver_cli.data import loader, toyworld
from uniperceiver_cli.evaluate import metrics
from uniperceiver_cli.train.catalogue import resolve_recipe
from uniperceiver_cli.train.recipe import EvalTaskSpec, Recipe, load_recipe

DEMO = Path("runs/toyworld-tiny")
COMMAND = "claims-command.json"  # an evaluation's argv, written once it has finished
DATA = Path("data/toyworld")

# 1. Tuning: prompt tuning (PT) on 1% against fine-tuning (FT) on all, at the same steps and batch, the reference's
# clipping (0.1) for both, each at the better of two learning rates chosen on the validation split (seed 0), then
# SEEDS new subsets each; a deeper prompt (DEEP_PROMPT deep prompts instead of 10) at PT's rate is the capacity
# control. Seen tasks (pre-training trains them: the COCO and Kinetics analogues) and unseen ones (MSVD's).
TUNE_STEPS, TUNE_BATCH, TUNE_WARMUP = 300, 16, 30
LEARNING_RATES = {"prompt-tune": (1e-3, 3e-3), "finetune": (1e-4, 3e-4)}
DEEP_PROMPT = 40
SEEDS = (1, 2, 3)


@dataclass(frozen=True)
class Tuned:
    """A task the tuning section runs: its recipes' suffix, whether pre-training trains it, its evaluation task and
    the metric chosen on (with a per-sample form for the bootstrap: CIDEr per image, R@1 per query, accuracy)."""

    name: str  # toyworld-tiny-{prompt-tune,finetune}-<name>
    seen: bool
    task: str
    metric: str
    validation: str  # the split the learning rate is chosen on


TUNED = (
    Tuned("image-caption", True, "image_captioning", "CIDEr", "images/val"),
    Tuned("motion", True, "motion_classification", "acc@1", "videos/val"),
    Tuned("video-caption", False, "video_captioning", "CIDEr", "videos/val"),
    Tuned("video-retrieval", False, "video_text_retrieval", "i2t_R@1", "videos/val"),
)

# 2. Dense against attribute MoE, DENSE_SEEDS seeds an arm at PRETRAIN_STEPS. The primary metrics, declared before any
# result: those attribute routing can separate (tasks with attribute rows of their own: MLM's text input, the
# captioning rows, retrieval's text targets) and the zero-shot ones it is meant to keep. Shape and motion
# classification share one attribute row, so no attribute routing separates them: secondary.
PRETRAIN_STEPS, MOE_SEEDS = 2000, (0, 1, 2, 3, 4)
INTERFERENCE_BATCHES = 8  # each task's gradient summed over this many batches (benchmarks/interference.py)
PRIMARY = (("mlm", "masked_acc"), ("image_captioning", "CIDEr"), ("image_text_retrieval", "i2t_R@1"),
           ("video_captioning", "CIDEr"), ("colour_classification", "acc@1"))

# 3. Routing levels, ROUTING_SEEDS seeds each at ROUTING_STEPS, the dense model beside them.
ROUTINGS = ("token", "context", "modality", "task", "attribute")
ROUTING_STEPS, ROUTING_SEEDS = 1000, (0, 1, 2)
# Task routing borrows a trained task's experts for each zero-shot task (`evaluate --routing-task`).
BORROWED = {"colour_classification": "shape_classification", "video_captioning": "image_captioning",
            "video_text_retrieval": "image_text_retrieval", "vqa": "image_captioning"}

# (evaluation task, metric, label, the README's closest benchmark, its BASE dense and MoE numbers without tuning)
TASKS = [
    ("shape_classification", "acc@1", "shape acc@1", "ImageNet-1k acc@1", 79.2, 80.3),
    ("colour_classification", "acc@1", "colour acc@1 (zero-shot)", None, None, None),
    ("image_text_retrieval", "i2t_R@1", "image-text i2t R@1", "COCO i2t R@1", 64.9, 64.6),
    ("image_captioning", "CIDEr", "image caption CIDEr", "COCO caption BLEU-4", 32.0, 33.2),
    ("mlm", "masked_acc", "MLM masked acc", None, None, None),
    ("motion_classification", "acc@1", "motion acc@1", "K400 acc@1", 74.5, 76.8),
    ("video_captioning", "CIDEr", "video caption CIDEr (zero-shot)", "MSVD caption BLEU-4", 22.6, 23.4),
    ("video_text_retrieval", "i2t_R@1", "video-text v2t R@1 (zero-shot)", "MSVD v2t R@1", 50.3, 52.8),
]
TRAINED = ("shape_classification", "image_captioning", "image_text_retrieval", "mlm", "motion_classification")
# The README's BASE rows: no tuning, prompt tuning on 1%, fine-tuning; seen tasks and MSVD (unseen).
PAPER_TUNING = {"image_captioning": ("COCO caption BLEU-4", 32.0, 35.5, 36.4),
                "motion_classification": ("K400 acc@1", 74.5, 74.8, 77.7),
                "video_captioning": ("MSVD caption BLEU-4", 22.6, 59.5, 63.3),
                "video_text_retrieval": ("MSVD v2t R@1", 50.3, 62.7, 62.8)}


@dataclass
class Job:
    """One `uniperceiver` command, the file that exists once it has finished, for training the recipe it trains,
    and the run whose model it starts from. It is run again where it has not finished, where it finished with
    another recipe (an older `make claims`) or before the run it starts from finished (that one was run again)."""

    key: str
    argv: list[str]
    done: Path
    folder: Path  # what it writes: removed first when it runs again
    recipe: dict | None = None
    needs: Path | None = None

    @property
    def command(self) -> str:
        return shlex.join(["uniperceiver", *self.argv])

    def finished(self) -> bool:
        if not self.done.is_file():
            return False
        if self.needs is not None and _done(self.needs).stat().st_mtime > self.done.stat().st_mtime:
            return False
        if self.recipe is not None:
            return _plain(yaml.safe_load((self.folder / "config.yaml").read_text())) == _plain(self.recipe)
        command = self.folder / COMMAND
        return command.is_file() and json.loads(command.read_text()) == self.argv


def _plain(data: Any) -> Any:
    """Recipe data as YAML reads it back: tuples are lists."""
    return json.loads(json.dumps(data))


def _done(run: Path) -> Path:
    return run / "eval" / "final" / "summary.json"


@dataclass
class Plan:
    runs: Path
    scale: float
    limit: int | None  # evaluate about this many samples per task (smoke runs); None: the whole test splits
    demo: Path = DEMO  # the demo's run: `make demo`'s, or one the plan trains
    jobs: list[Job] = field(default_factory=list)

    def steps(self, count: int) -> int:
        return count if self.scale == 1 else max(10, round(count * self.scale))

    def train(self, key: str, stage: str, recipe: str, steps: int, overrides: Sequence[str] = (),
              init: Path | None = None) -> Path:
        """A training run of ``steps`` (times the scale) into ``runs/<key>``, from the model of run ``init``."""
        run_dir = self.runs / key
        extra = list(overrides) + ([] if init is None else [f"init={init}"])
        if self.steps(steps) != _recipe(recipe).train.steps:
            extra.append(f"train.steps={self.steps(steps)}")
        if self.limit is not None:
            count = len(_recipe(recipe).evaluation.tasks)
            extra += [f"evaluation.tasks.{i}.max_samples={self.limit}" for i in range(count)]
        expected = load_recipe(resolve_recipe(recipe), extra).to_dict()
        self.jobs.append(Job(key, [stage, "--recipe", recipe, "--run-dir", str(run_dir), *extra],
                             _done(run_dir), run_dir, expected, init))
        return run_dir

    def evaluate(self, key: str, model: Path, out: Path, options: Sequence[str]) -> None:
        limit = [] if self.limit is None else ["--limit", str(self.limit)]
        self.jobs.append(Job(key, ["evaluate", "--model", str(model), "--out", str(out), *options, *limit],
                             out / "results.json", out, needs=model))


@functools.cache
def _recipe(name: str) -> Recipe:
    """A shipped recipe, read once (callers do not change it)."""
    return load_recipe(resolve_recipe(name))


def demo_is_current() -> bool:
    """Whether runs/toyworld-tiny (`make demo`) finished with the shipped toyworld-tiny recipe as it is now."""
    config = DEMO / "config.yaml"
    if not (config.is_file() and _done(DEMO).is_file() and (DEMO / "final").is_dir()):
        return False
    return _plain(yaml.safe_load(config.read_text())) == _plain(_recipe("toyworld-tiny").to_dict())


def plan(runs: Path, scale: float = 1.0, limit: int | None = None, chosen: dict[str, float] | None = None) -> Plan:
    """Every run of the page, in order. ``chosen``: each tuning arm's learning rate (:func:`choose_rates`, once the
    search has run); without it the plan holds the runs up to the search's, which decide it."""
    p = Plan(runs, scale, limit)
    # The demo's model (`make demo`'s run when it is current): zero-shot, and where every tuning run starts.
    current = scale == 1 and limit is None and demo_is_current()
    demo = p.demo = DEMO if current else p.train("demo", "pretrain", "toyworld-tiny", 6200)
    for tuned in TUNED:  # zero-shot again where the tuned runs evaluate otherwise (video captions: their tokens)
        if _evaluate_options(_tuned_evaluation(tuned)) != _evaluate_options(_demo_evaluation(tuned)):
            p.evaluate(f"zero-shot-{tuned.name}", demo, p.runs / f"zero-shot-{tuned.name}",
                       _evaluate_options(_tuned_evaluation(tuned)))
    for tuned in TUNED:  # 1. the learning-rate search on the validation split, seed 0
        for kind, rates in LEARNING_RATES.items():
            for lr in rates:
                p.train(f"search-{kind}-{tuned.name}-{lr:g}", kind, f"toyworld-tiny-{kind}-{tuned.name}", TUNE_STEPS,
                        [*_tuning(lr), f"evaluation.tasks.0.data={tuned.validation}"], init=demo)
    if chosen is None:
        return p
    for tuned in TUNED:  # then the seeds (new subsets), and the deeper prompt
        pt, ft = chosen[f"prompt-tune-{tuned.name}"], chosen[f"finetune-{tuned.name}"]
        for seed in SEEDS:
            p.train(f"prompt-tune-{tuned.name}-seed{seed}", "prompt-tune", f"toyworld-tiny-prompt-tune-{tuned.name}",
                    TUNE_STEPS, [*_tuning(pt), f"train.seed={seed}"], init=demo)
            p.train(f"deep-prompt-{tuned.name}-seed{seed}", "prompt-tune", f"toyworld-tiny-prompt-tune-{tuned.name}",
                    TUNE_STEPS, [*_tuning(pt), f"train.seed={seed}",
                                 f"model.overrides.prompt.deep_prompt_length={DEEP_PROMPT}"], init=demo)
            p.train(f"finetune-{tuned.name}-seed{seed}", "finetune", f"toyworld-tiny-finetune-{tuned.name}",
                    TUNE_STEPS, [*_tuning(ft), f"train.seed={seed}"], init=demo)
    # 2. Dense against attribute MoE.
    for seed in MOE_SEEDS:
        p.train(f"dense-seed{seed}", "pretrain", "toyworld-tiny", PRETRAIN_STEPS, [f"train.seed={seed}"])
        p.train(f"moe-seed{seed}", "pretrain", "toyworld-tiny-moe", PRETRAIN_STEPS, [f"train.seed={seed}"])
    # 3. Routing levels.
    zero_shot = {t.name: t for t in _recipe("toyworld-tiny-moe").evaluation.tasks}
    for seed in ROUTING_SEEDS:
        p.train(f"routing-dense-seed{seed}", "pretrain", "toyworld-tiny", ROUTING_STEPS, [f"train.seed={seed}"])
        for routing in ROUTINGS:
            run = p.train(f"routing-{routing}-seed{seed}", "pretrain", "toyworld-tiny-moe", ROUTING_STEPS,
                          [f"model.overrides.moe.routing={routing}", f"train.seed={seed}"])
            if routing == "task":
                for task, borrowed in BORROWED.items():
                    if task in zero_shot:
                        p.evaluate(f"routing-task-seed{seed}-{task}", run, run / "eval" / "borrowed" / task,
                                   [*_evaluate_options(zero_shot[task]), "--routing-task", borrowed])
    return p


def _tuned_evaluation(tuned: Tuned) -> EvalTaskSpec:
    """The evaluation task of ``tuned``'s tuning recipes (prompt tuning's; fine-tuning's is the same)."""
    return _recipe(f"toyworld-tiny-prompt-tune-{tuned.name}").evaluation.tasks[0]


def _demo_evaluation(tuned: Tuned) -> EvalTaskSpec:
    """The demo recipe's evaluation task that ``tuned`` is."""
    return next(t for t in _recipe("toyworld-tiny").evaluation.tasks if t.name == tuned.task)


def _tuning(lr: float) -> list[str]:
    """The overrides that make prompt tuning and fine-tuning compute-matched: steps, batch, warm-up and clipping."""
    return [f"tasks.0.batch_size={TUNE_BATCH}", f"train.lr={lr:g}", f"train.warmup_steps={TUNE_WARMUP}",
            "train.grad_clip=0.1"]


def choose_rates(p: Plan) -> dict[str, float]:
    """Each tuning arm's learning rate: the search's best on the validation split (its first on a tie)."""
    chosen = {}
    for tuned in TUNED:
        for kind, rates in LEARNING_RATES.items():
            scores = {lr: value(p.runs / f"search-{kind}-{tuned.name}-{lr:g}", tuned.task, tuned.metric)
                      for lr in rates}
            if None in scores.values():
                raise SystemExit(f"claims: the learning-rate search of {kind} {tuned.name} has not finished")
            chosen[f"{kind}-{tuned.name}"] = max(rates, key=lambda lr: scores[lr])
    return chosen


def _evaluate_options(spec: EvalTaskSpec) -> list[str]:
    """`uniperceiver evaluate` options that repeat a recipe's evaluation task: its data, type, label set, frames,
    decoding tokens, beam, length and captions per item (what the ToyWorld tasks set; the rest are defaults)."""
    options = ["--data", str(DATA / spec.data), "--task", spec.type]
    if spec.label_set:
        options += ["--label-set", spec.label_set]
    if spec.type.startswith("video"):
        options += ["--num-frames", str(spec.num_frames), "--frame-stride", str(spec.frame_stride)]
    for folder in spec.vocabulary_from:
        options += ["--vocabulary-from", str(DATA / folder)]
    if spec.type.endswith("caption"):
        options += ["--beam-size", str(spec.beam_size), "--max-len", str(spec.max_len)]
    if spec.captions_per_item:
        options += ["--captions-per-item", str(spec.captions_per_item)]
    return options


def run_jobs(p: Plan, times_path: Path) -> None:
    """Run the jobs not done yet, in order; each one's wall seconds are kept in ``times_path``."""
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    logs = p.runs / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for i, job in enumerate(p.jobs, 1):
        if job.finished():  # asked here, not up front: the run a job starts from may just have run again
            print(f"[{i}/{len(p.jobs)}] done before: {job.key}", flush=True)
            continue
        if job.folder.exists():  # a previous attempt stopped part-way, or trained another recipe
            shutil.rmtree(job.folder)
        print(f"[{i}/{len(p.jobs)}] {job.command}", flush=True)
        start = time.perf_counter()
        with open(logs / f"{job.key}.log", "w") as log:
            code = subprocess.run([sys.executable, "-m", "uniperceiver_cli", *job.argv], stdout=log,
                                  stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode
        if code != 0 or not job.done.is_file():
            tail = (logs / f"{job.key}.log").read_text().strip().splitlines()[-3:]
            sys.exit(f"claims: {job.key} failed (exit {code}); {logs / job.key}.log ends:\n" + "\n".join(tail))
        times[job.key] = time.perf_counter() - start
        (job.folder / COMMAND).write_text(json.dumps(job.argv) + "\n")
        times_path.write_text(json.dumps(times, indent=2) + "\n")
        print(f"      done in {times[job.key]:.0f} s", flush=True)


# --- reading the runs --------------------------------------------------------------------------------------------


def results(run: Path) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """A run's final metrics by evaluation task, and the tasks that could not be evaluated (with the reason);
    nothing for a run not done (`--report-only` part-way)."""
    if not _done(run).is_file():
        return {}, {}
    summary = json.loads(_done(run).read_text())
    return summary["results"], summary.get("errors", {})


def value(run: Path, task: str, metric: str) -> float | None:
    return results(run)[0].get(task, {}).get(metric)


def evaluated(out: Path, metric: str) -> float | None:
    """A metric of an `evaluate` job's results.json, None when it has not run."""
    path = out / "results.json"
    return json.loads(path.read_text())["metrics"].get(metric) if path.is_file() else None


def per_sample(predictions: Path, metric: str) -> dict[str, float]:
    """Each test sample's share of a metric, from an evaluation's predictions.jsonl, so that the metric is their mean
    and a bootstrap can resample them: acc@1 and i2t_R@1 as 100 or 0 (the top label, the top text right or not),
    CIDEr as each image's own CIDEr-D (x100; the corpus CIDEr is their mean, the document frequencies those of
    the whole test split). ValueError for another metric."""
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    if metric == "acc@1":
        return {row["key"]: 100.0 * (row["top"][0]["label"] == row["label"]) for row in rows}
    if metric == "i2t_R@1":
        return {row["key"]: 100.0 * bool(row["correct"]) for row in rows}
    if metric != "CIDEr":
        raise ValueError(f"no per-sample form of {metric}")
    return metrics.cider_per_caption({row["key"]: row["caption"] for row in rows},
                                     {row["key"]: row["references"] for row in rows})


# --- the page ----------------------------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numbers: Sequence[int]) -> list[str]:
    """A markdown table; the columns ``numbers`` are right-aligned."""
    align = ["---:" if i in numbers else "---" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _mean_sd(values: Sequence[float]) -> str:
    """"mean ± sd (n)" of seeds' values."""
    if not values:
        return "-"
    sd = stdev(values) if len(values) > 1 else 0.0
    return f"{mean(values):.1f} ± {sd:.1f} ({len(values)})"


def _samples(run: Path, task: str, metric: str) -> dict[str, float] | None:
    """A finished run's per-sample metric on one evaluation task (:func:`per_sample`), None when not there."""
    predictions = run / "eval" / "final" / task / "predictions.jsonl"
    return per_sample(predictions, metric) if predictions.is_file() else None


def _aligned(*arms: Sequence[dict[str, float] | None]) -> list[np.ndarray] | None:
    """Each arm's per-sample metrics (one dict per run) as a (runs, samples) array over the samples every run of
    every arm scored, in key order (paired across the arms); None when a run has none."""
    found = [d for arm in arms for d in arm]
    if not found or any(d is None for d in found):
        return None
    keys = sorted(set.intersection(*(set(d) for d in found)))
    return [np.array([[d[k] for k in keys] for d in arm]) for arm in arms]


def paper_share(task: str) -> float:
    """The share of fine-tuning's gain that the paper's prompt tuning on 1% recovers on ``task``'s analogue."""
    _, zero, tuned, full = PAPER_TUNING[task]
    return (tuned - zero) / (full - zero)


def _zero_shot(p: Plan, tuned: Tuned) -> tuple[float | None, dict[str, float] | None]:
    """The zero-shot metric of ``tuned`` and its per-sample form: the demo's own evaluation, or where the tuned runs
    evaluate otherwise, the plan's `zero-shot-<task>` evaluation of the demo's model as they do."""
    folder = p.runs / f"zero-shot-{tuned.name}"
    if not any(job.folder == folder for job in p.jobs):
        return value(p.demo, tuned.task, tuned.metric), _samples(p.demo, tuned.task, tuned.metric)
    predictions = folder / "predictions.jsonl"
    return (evaluated(folder, tuned.metric),
            per_sample(predictions, tuned.metric) if predictions.is_file() else None)


def _share_shown(share: tuple[float, float, float] | None) -> str:
    if share is None:
        return "-"
    if not math.isfinite(share[1]):
        return "none: fine-tuning's gain is not significant"
    estimate, low, high = (round(100 * x) for x in share)  # integers: no "-0"
    return f"{estimate}% [{low}, {high}]"


def share_verdict(share: tuple[float, float, float], paper: float, memorized: str | None = None) -> str:
    """Our share's interval against the paper's share on the task's analogue. Wholly on one side of it: "does not
    agree (significant)", or, when prompt tuning recovers less and ``memorized`` says how it fitted its 1% subset
    to nothing, "not reproduced at this scale" with that evidence. Holding it: "agrees" when narrower than 100
    points, else "not resolved at this power"."""
    _, low, high = share
    if not math.isfinite(high - low):
        return "not resolved at this power: fine-tuning's gain over zero-shot is not significant"
    if low <= paper <= high:
        if high - low > 1.0:
            return f"not resolved at this power (interval {100 * low:.0f}% to {100 * high:.0f}%)"
        return "agrees"
    if high < paper and memorized is not None:
        return f"not reproduced at this scale: {memorized}"
    return "does not agree (significant): " + ("recovers less" if high < paper else "recovers more")


def final_loss(run: Path, task: str) -> float | None:
    """A training run's last logged loss on ``task`` (metrics.jsonl), None when it has not logged one."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    losses = [row[f"{task}/loss"] for row in map(json.loads, path.read_text().splitlines()) if f"{task}/loss" in row]
    return losses[-1] if losses else None


MEMORIZED = 0.01  # a final training loss below this: the subset is fitted to nothing (classification's loss)


def subset_size(tuned: Tuned, seed: int = SEEDS[0]) -> str:
    """What prompt tuning's 1% of ``tuned`` holds (its recipe's draw, seed ``seed``): items, and for captioned data
    the (item, caption) pairs."""
    spec = _recipe(f"toyworld-tiny-prompt-tune-{tuned.name}").tasks[0]
    shards = [shard.url for shard in loader._shards(DATA / spec.data)]  # in the manifest's order, as training's
    captioned = tuned.task != "motion_classification"
    try:
        chosen = loader.choose_subset(shards, spec.subset, seed, balanced=not captioned,
                                      captions=captioned and spec.subset_by == "caption")
    except ValueError as e:  # the data is too small for the fraction (the page of a test's made-up runs)
        return f"none ({e})"
    items = f"{len(chosen)} {'images' if tuned.task.startswith('image') else 'clips'}"
    if not captioned or spec.subset_by == "item":
        return items + ("" if not captioned else " with their captions")
    return f"{sum(len(indices or ()) for indices in chosen.values())} pairs over {items}"


def tuning_section(p: Plan, chosen: dict[str, float]) -> list[str]:
    rows, search = [], []
    for tuned in TUNED:
        for kind, rates in LEARNING_RATES.items():
            scores = [f"{lr:g}: {_f(value(p.runs / f'search-{kind}-{tuned.name}-{lr:g}', tuned.task, tuned.metric))}"
                      for lr in rates]
            search.append([tuned.name, kind, ", ".join(scores), f"{chosen.get(f'{kind}-{tuned.name}', 0):g}"])
        arms = {name: [p.runs / f"{name}-{tuned.name}-seed{seed}" for seed in SEEDS]
                for name in ("prompt-tune", "deep-prompt", "finetune")}
        zero_shot, zero = _zero_shot(p, tuned)
        values = {name: [v for v in (value(r, tuned.task, tuned.metric) for r in runs) if v is not None]
                  for name, runs in arms.items()}
        samples = {name: [_samples(r, tuned.task, tuned.metric) for r in runs] for name, runs in arms.items()}
        shares = {}
        for name in ("prompt-tune", "deep-prompt"):
            paired = _aligned([zero], samples[name], samples["finetune"])
            shares[name] = None if paired is None else claim_stats.share_interval(paired[0][0], *paired[1:])
        analogue, pz, pp, pf = PAPER_TUNING[tuned.task]
        paper = paper_share(tuned.task)
        shown = {name: _share_shown(got) for name, got in shares.items()}
        losses = {name: [v for v in (final_loss(r, tuned.task) for r in arms[name]) if v is not None]
                  for name in ("prompt-tune", "finetune")}
        size = subset_size(tuned)
        fitted = ", ".join(f"{name} {mean(got):.2g}" if got else f"{name} -" for name, got in losses.items())
        memorized = None
        if losses["prompt-tune"] and mean(losses["prompt-tune"]) < MEMORIZED:
            memorized = (f"prompt tuning fits its 1% ({size}) to a training loss of "
                         f"{mean(losses['prompt-tune']):.0e}")
            if values["prompt-tune"] and zero_shot is not None and mean(values["prompt-tune"]) < zero_shot:
                memorized += f" and ends {zero_shot - mean(values['prompt-tune']):.1f} points below zero-shot"
        rows.append([f"{tuned.task.replace('_', ' ')} ({'seen' if tuned.seen else 'unseen'}), {tuned.metric}",
                     _f(zero_shot), _mean_sd(values["prompt-tune"]),
                     _mean_sd(values["deep-prompt"]), _mean_sd(values["finetune"]), shown["prompt-tune"],
                     shown["deep-prompt"], f"{size}; {fitted}", f"{analogue}: {pz} / {pp} / {pf}, {100 * paper:.0f}%",
                     "-" if shares["prompt-tune"] is None else share_verdict(shares["prompt-tune"], paper, memorized)])
    higher = [kind for kind, rates in LEARNING_RATES.items()
              if all(chosen.get(f"{kind}-{tuned.name}") == rates[-1] for tuned in TUNED)]
    return [
        "## 1. Prompt tuning on 1% against fine-tuning on all", "",
        "The papers: prompt tuning on 1% of a task's data recovers much of full fine-tuning's gain over no tuning: "
        + "; ".join(f"{100 * paper_share(task):.0f}% on {PAPER_TUNING[task][0]}" for task in PAPER_TUNING)
        + " (the first two tasks pre-training saw, the MSVD ones unseen). "
        f"Here, from the demo's model (`{p.demo}`): prompt tuning (the reference's parameters: "
        "10 deep prompts a layer, the `<|spe|>` bias, the LayerNorms, `ln_post`, for motion the classifier prompt) "
        "on 1%, the same with 40 deep prompts (the capacity control), and fine-tuning of every parameter on all "
        f"the data, each {TUNE_STEPS} steps of {TUNE_BATCH} with {TUNE_WARMUP} warm-up steps and the reference's "
        "clipping (0.1). 1% is drawn as the reference draws it: per class for motion, by image for image "
        "captioning (its COCO), by (clip, caption) pair for the video tasks (its MSVD), and each seed draws a new "
        "one. Each method's learning rate is the better of two on the validation split (seed 0; below), never "
        "on the test split.", "",
        *_table(["task", "method", "validation metric by learning rate", "chosen"], search, numbers=()),
        "Two rates a method (a small search, the same for both) put every choice at an edge of the search, so a "
        "wider one could move any of them" + "".join(f"; {kind} chose its higher rate on every task"
                                                     for kind in higher) + ".", "",
        "Test splits; mean ± standard deviation over the seeds (how many in brackets). The share is (tuned - "
        "zero-shot) / (fine-tuned - zero-shot) of the mean metric, with its 95% bootstrap interval over the test "
        "samples and the seeds (benchmarks/claim_stats.py; it errs wide). The fit column: what the 1% holds (seed "
        f"{SEEDS[0]}'s draw) and the last training loss of each method, mean over the seeds. Verdict: an interval "
        "wholly on one side of the paper's share on the analogue task does not agree, or, where prompt tuning "
        f"recovers less after fitting its 1% to a training loss below {MEMORIZED:g}, is not reproduced at this "
        "scale (a subset this small is memorized: the scale, not the method, is the likely reason); an interval "
        "holding the paper's share agrees, unless it is wider than 100 points: not resolved at this power. The "
        "four intervals are not corrected for their number: at 95% each, one of four wrongly placed is not rare "
        "(about 1 in 5 under every paper's share).", "",
        *_table(["task, metric", "zero-shot", "prompt-tuned 1%", "deeper prompt 1%", "fine-tuned 100%",
                 "share [95%]", "deeper prompt's share", "fit: 1%; training loss",
                 "paper (BASE): none / PT 1% / FT, share", "verdict"], rows, numbers=(1, 2, 3, 4, 5, 6)), ""]


def _comparison(dense: Sequence[Path], moe: Sequence[Path], task: str, metric: str) -> tuple[list, list] | None:
    d = [value(r, task, metric) for r in dense]
    m = [value(r, task, metric) for r in moe]
    return None if None in d + m else (d, m)


def moe_section(p: Plan) -> list[str]:
    dense = [p.runs / f"dense-seed{seed}" for seed in MOE_SEEDS]
    moe = [p.runs / f"moe-seed{seed}" for seed in MOE_SEEDS]
    labels = {(task, metric): label for task, metric, label, *_ in TASKS}
    papers = {(task, metric): "-" if bench is None else f"{bench}: {d} → {m}" for task, metric, _, bench, d, m in TASKS}
    found = {key: _comparison(dense, moe, *key) for key in [*PRIMARY, *((t, m) for t, m, *_ in TASKS
                                                                       if (t, m) not in PRIMARY)]}
    primary = [key for key in PRIMARY if found[key] is not None]
    adjusted = dict(zip(primary, claim_stats.holm([claim_stats.welch(*found[k]) for k in primary]), strict=True))
    rows, secondary = [], []
    for key, pair in found.items():
        if pair is None:
            continue
        d, m = pair
        p_value = claim_stats.welch(d, m)
        row = [labels.get(key, f"{key[0]} {key[1]}"), _mean_sd(d), _mean_sd(m), f"{mean(m) - mean(d):+.2f}",
               f"{p_value:.3f}"]
        if key in adjusted:
            detectable = claim_stats.detectable_difference(d, m, tests=len(primary))
            rows.append([*row, f"{claim_stats.permutation(d, m):.3f}", f"{adjusted[key]:.3f}", f"{detectable:.2f}",
                         papers.get(key, "-"),
                         claim_stats.verdict(mean(m) - mean(d), adjusted[key], detectable, expected_sign=1)])
        else:
            secondary.append([*row, papers.get(key, "-")])
    conflicts = {}
    for name, run, recipe in (("dense", dense[0], "toyworld-tiny"), ("MoE", moe[0], "toyworld-tiny-moe")):
        if (run / "final").is_dir():
            conflicts[name] = interference.cosines(interference.task_gradients(run / "final", recipe,
                                                                               INTERFERENCE_BATCHES))
    pairs = [[f"{a} x {b}", *(_f(conflicts[name].get((a, b)), 3) for name in conflicts)]
             for a, b in (next(iter(conflicts.values())) if conflicts else {})]
    return [
        "## 2. Dense against attribute-routed MoE", "",
        "The MoE paper: conditional MoE reduces the interference between tasks and beats the dense model without "
        "tuning (ImageNet 79.2 → 80.3, MSVD captioning 22.6 → 23.4). Here: `toyworld-tiny` against "
        f"`toyworld-tiny-moe` (4 experts, top-2, attribute routing), {p.steps(PRETRAIN_STEPS):,} steps, "
        f"{len(MOE_SEEDS)} seeds each. Declared before the results, the primary metrics are those attribute "
        "routing can separate: tasks with attribute rows of their own (MLM's text input, the captioning rows, "
        "retrieval's text targets) and zero-shot ones (colour, video captioning). Shape and motion classification "
        "share one attribute row, so no attribute routing separates them: they are secondary. Welch's test (p), "
        "Holm's correction over the primary metrics (the verdict's); beside it the exact permutation test, which "
        "assumes no normal spread (its smallest p at 5 seeds an arm is 0.008); the detectable difference is what "
        "the corrected test finds 80% of the time at these seeds (the power a \"not resolved\" has). The paper's "
        "BASE numbers without tuning are for reading: a different scale and metric.", "",
        *_table(["primary metric", "dense", "attribute MoE", "MoE − dense", "p", "p (permutation)", "p (Holm)",
                 "detectable", "paper (BASE): dense → MoE", "verdict"], rows, numbers=(1, 2, 3, 4, 5, 6, 7)),
        "Secondary metrics (no correction; for reading, not for verdicts):", "",
        *_table(["metric", "dense", "attribute MoE", "MoE − dense", "p", "paper (BASE): dense → MoE"], secondary,
                numbers=(1, 2, 3, 4)),
        "Interference, the reference's measure (`tools/calinterference.ipynb`): the cosine between two training "
        "tasks' gradients on every layer's second feed-forward weight (an MoE layer's experts together), each "
        f"summed over {INTERFERENCE_BATCHES} batches, on the seed-0 models (`benchmarks/interference.py`). A "
        "negative cosine: a step for one task undoes part of a step for the other.", "",
        *_table(["tasks", *conflicts], pairs, numbers=range(1, len(conflicts) + 1))]


def _task_means(run: Path) -> tuple[float | None, float | None]:
    """The mean of a run's metrics over the trained tasks and over the zero-shot ones (task routing: borrowed)."""
    def routed(task: str, metric: str) -> float | None:
        got = value(run, task, metric)
        return got if got is not None else evaluated(run / "eval" / "borrowed" / task, metric)

    seen = [value(run, task, metric) for task, metric, *_ in TASKS if task in TRAINED]
    unseen = [routed(task, metric) for task, metric, *_ in TASKS if task not in TRAINED]
    return tuple(None if None in values else mean(values) for values in (seen, unseen))


def routing_section(p: Plan, times: dict[str, float]) -> list[str]:
    levels = ("dense", *ROUTINGS)
    means = {level: [_task_means(p.runs / f"routing-{level}-seed{seed}") for seed in ROUTING_SEEDS]
             for level in levels}
    tests, rows = [], []
    for column, what in ((0, "trained tasks"), (1, "zero-shot tasks")):
        attribute = [m[column] for m in means["attribute"] if m[column] is not None]
        for level in levels:
            other = [m[column] for m in means[level] if m[column] is not None]
            if level != "attribute" and len(attribute) > 1 and len(other) > 1:
                tests.append((what, level, attribute, other, claim_stats.welch(attribute, other)))
    adjusted = claim_stats.holm([t[4] for t in tests])
    for (what, level, attribute, other, p_value), p_holm in zip(tests, adjusted, strict=True):
        detectable = claim_stats.detectable_difference(attribute, other, tests=len(tests))
        difference = mean(attribute) - mean(other)
        rows.append([what, level, _mean_sd(attribute), _mean_sd(other), f"{difference:+.2f}", f"{p_value:.3f}",
                     f"{p_holm:.3f}", f"{detectable:.2f}",
                     claim_stats.verdict(difference, p_holm, detectable, expected_sign=1)])
    measured = {level: [times[k] for seed in ROUTING_SEEDS if (k := f"routing-{level}-seed{seed}") in times]
                for level in levels}
    seconds = [[level, _f(mean(got), 0) if got else "-"] for level, got in measured.items()]
    return [
        "## 3. Routing levels", "",
        "The MoE paper: attribute routing is the best of the routing levels, and task routing cannot serve "
        f"unseen tasks. Here: `toyworld-tiny-moe` at each `moe.routing`, {p.steps(ROUTING_STEPS):,} steps, "
        f"{len(ROUTING_SEEDS)} seeds each, and the dense model. For each run, the mean of the trained tasks' "
        "metrics and of the zero-shot ones (task routing refuses an unseen task: `evaluate --routing-task` then "
        "borrows a trained task's experts). Attribute routing against each other level on both means: Welch's "
        "test, Holm's correction over all of them.", "",
        *_table(["means over", "against", "attribute", "that level", "attribute − level", "p", "p (Holm)",
                 "detectable", "verdict"], rows, numbers=(2, 3, 4, 5, 6, 7)),
        "Compute: token and context routing run two experts' linears per token (top-2, dropless); attribute, "
        "modality and task routing merge the two chosen experts per segment, so a token costs one linear. Mean "
        "wall seconds of a run (training and evaluation):", "",
        *_table(["routing", "seconds"], seconds, numbers=(1,))]


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, Python {platform.python_version()}"


def report(p: Plan, out: Path, chosen: dict[str, float]) -> str:
    times = json.loads((p.runs / "times.json").read_text()) if (p.runs / "times.json").is_file() else {}
    lines = [
        "# The papers' claims on ToyWorld", "",
        "Written by `make claims` (`benchmarks/claims.py`); every number below comes from the runs listed at the "
        "end, on this machine: " + _machine() + ". ToyWorld (docs/data.md) is a laptop-scale world: the models "
        "are the tiny preset (64 wide, 3 layers) trained for minutes, so the numbers are not the papers'; the "
        "question is whether each claim holds here, and at what power. Verdicts: \"agrees\", \"does not agree "
        "(significant)\", \"not resolved at this power\" with the difference the test would have detected; none "
        "comes from a single run. The tests and the correction are checked in tests/test_claim_stats.py, a "
        "simulation under no difference included (each rule's false-positive rate at or below 5%).", "",
        *tuning_section(p, chosen),
        *moe_section(p),
        *routing_section(p, times),
        "## The runs", "",
        f"Wall time of the runs below: {sum(times.get(j.key, 0.0) for j in p.jobs) / 60:.0f} minutes"
        + (" (the demo's model was `make demo`'s, `runs/toyworld-tiny`: its training is not counted)"
           if p.demo == DEMO else "") + ".", "",
        *_table(["run", "seconds", "command"],
                [[j.key, _f(times.get(j.key), 0), f"`{j.command}`"] for j in p.jobs], numbers=(1,)),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/claims"), help="where the runs go")
    parser.add_argument("--out", type=Path, default=Path("docs/claims.md"), help="the page")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every run's steps (smoke runs)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate about this many samples a task (smoke runs)")
    parser.add_argument("--report-only", action="store_true", help="write the page from the runs done")
    parser.add_argument("--runs-only", action="store_true", help="run what is not done, write no page")
    args = parser.parse_args()
    if not (DATA / toyworld.SUMMARY).is_file():
        sys.exit(f"claims: no ToyWorld at {DATA}: run `uniperceiver prepare-data toyworld --out {DATA}` first")
    start = time.perf_counter()
    search = plan(args.runs, args.scale, args.limit)  # up to the learning-rate search, which decides the rest
    if not args.report_only:
        run_jobs(search, args.runs / "times.json")
    chosen = choose_rates(search)
    p = plan(args.runs, args.scale, args.limit, chosen=chosen)
    if not args.report_only:
        run_jobs(p, args.runs / "times.json")
    if args.runs_only:
        return
    print(report(p, args.out, chosen))
    print(f"\nwrote {args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
