"""`make claims`: the two papers' claims checked on ToyWorld, written to docs/claims.md with PNG plots.

    python benchmarks/claims.py                      # every run (72 min on 2 cores, 82 with the demo), the page
    python benchmarks/claims.py --report-only        # the page from the runs already done
    python benchmarks/claims.py --scale 0.02 --limit 64 --runs /tmp/claims --out /tmp/claims.md   # a smoke run

1. Tuning on tasks pre-training never saw (video captioning, video-text retrieval), from the demo's model
   (runs/toyworld-tiny, trained first when it is missing or was made by another recipe): zero-shot, prompt-tuned
   on 1% of the clips, fine-tuned on all of them, and the share of fine-tuning's gain that prompt tuning recovers.
2. Dense against attribute-routed MoE (tiny-moe: 4 experts, top-2, whose weights are merged per segment, so a
   token costs what it costs in the dense model), equal steps, two seeds each, on all eight ToyWorld tasks.
3. Routing levels (token, context, modality, task, attribute) and the dense model at fewer steps, on the
   trained and the zero-shot tasks; task routing refuses an unseen task, and is then evaluated once more with a
   trained task's experts (`evaluate --routing-task`).

Every run is a `uniperceiver` command, run in turn (the machine's cores go to one job at a time); the page lists
them. A run whose results exist is not run again, so an interrupted `make claims` resumes where it stopped; a run
left unfinished is started over. Figures are from this machine, named on the page.
"""

from __future__ import annotations

import argparse
import functools
import json
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
from statistics import mean
from typing import Any

import yaml

from uniperceiver_cli.data import toyworld
from uniperceiver_cli.data.shards import Manifest, read_metas
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


def true_recall(run: Path, task: str, folder: str) -> float | None:
    """R@1 counting a top caption that is true of the item (ToyWorld's scenes) as a hit."""
    predictions = run / "eval" / "final" / task / "predictions.jsonl"
    if not predictions.is_file():
        return None
    best = {row["key"]: row["best_text"] for row in map(json.loads, predictions.read_text().splitlines())}
    return toyworld.true_caption_recall(best, _metas(DATA / folder))


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
    import contextlib
    import io

    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with contextlib.redirect_stdout(io.StringIO()):
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({row["key"]: [{"caption": c} for c in row["references"]] for row in rows})
        res = tokenizer.tokenize({row["key"]: [{"caption": row["caption"]}] for row in rows})
        _, scores = Cider().compute_score(gts, res)
    return {key: 100.0 * float(score) for key, score in zip(gts, scores, strict=True)}


@functools.cache
def _metas(folder: Path) -> dict[str, dict]:
    """A split's sample metas, read from its shards once per report."""
    return read_metas(folder)


def curves(run: Path, tasks: Sequence[str]) -> dict[str, tuple[list[int], list[float]]]:
    """Each training task's loss by logged step (metrics.jsonl)."""
    out: dict[str, tuple[list[int], list[float]]] = {task: ([], []) for task in tasks}
    path = run / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        for task in tasks:
            if f"{task}/loss" in record:
                out[task][0].append(record["step"])
                out[task][1].append(record[f"{task}/loss"])
    return out


# --- the page ----------------------------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numbers: Sequence[int]) -> list[str]:
    """A markdown table; the columns ``numbers`` are right-aligned."""
    align = ["---:" if i in numbers else "---" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def recovered(zero: float | None, prompt: float | None, full: float | None) -> float | None:
    """The share (%) of fine-tuning's gain over zero-shot that prompt tuning recovers; None where fine-tuning
    gained less than half a point (a share of nothing)."""
    if None in (zero, prompt, full) or full - zero < 0.5:
        return None
    return 100.0 * (prompt - zero) / (full - zero)


def spread(values: Sequence[float]) -> float:
    """Half the range: the mean +- this covers both seeds."""
    return (max(values) - min(values)) / 2


def verdict(delta: float, noise: float, paper_delta: float | None) -> str:
    """How our MoE-minus-dense difference stands against the seeds' spread and the paper's difference."""
    if abs(delta) <= noise:
        ours = "within the seeds' spread"
        return ours if paper_delta is None else f"{ours}: not resolved"
    direction = "MoE better" if delta > 0 else "MoE worse"
    if paper_delta is None:
        return direction
    if abs(paper_delta) < 0.5:
        return f"{direction}; the paper: about equal"
    return f"{direction}: " + ("agrees" if (delta > 0) == (paper_delta > 0) else "**contradicts the paper**")


def tuning_section(p: Plan, demo: Path, plots: Path, rel: str) -> list[str]:
    rows, bars, verdicts = [], {}, []
    entries = [("video_captioning", "BLEU-4", "video captioning BLEU-4", "caption", "video_captioning"),
               ("video_text_retrieval", "i2t_R@1", "video-text v2t R@1", "retrieval", "video_text_retrieval"),
               ("video_text_retrieval", "t2i_R@1", "video-text t2v R@1", "retrieval", "video_text_retrieval/t2i")]
    for task, metric, label, kind, paper_key in entries:
        # Zero-shot captions over the tokens the tuned models decode over (pre-training's and the video captions').
        zero = evaluated(p.runs / "zero-shot-video-caption", metric) if kind == "caption" else value(demo, task, metric)
        prompt = value(p.runs / f"prompt-tune-video-{kind}", task, metric)
        prompt_all = value(p.runs / f"prompt-tune-all-video-{kind}", task, metric)
        full = value(p.runs / f"finetune-video-{kind}", task, metric)
        name, pz, pp, pf = PAPER_TUNING[paper_key]
        ours, theirs, ours_all = recovered(zero, prompt, full), recovered(pz, pp, pf), recovered(zero, prompt_all, full)
        rows.append([label, _f(zero), _f(prompt), _f(prompt_all), _f(full), _percent(ours), _percent(ours_all),
                     f"{name}: {pz} / {pp} / {pf}, {theirs:.0f}%"])
        verdicts.append(_tuning_verdict(label, ours, ours_all, f"{theirs:.0f}% on {name}"))
        bars[label] = (zero, prompt, prompt_all, full, (pz, pp, pf))
    truth = [true_recall(run, "video_text_retrieval", "videos/test") for run in
             (demo, p.runs / "prompt-tune-video-retrieval", p.runs / "prompt-tune-all-video-retrieval",
              p.runs / "finetune-video-retrieval")]
    rows.append(["video-text v2t R@1, true caption", *map(_f, truth), _percent(recovered(*truth[:2], truth[3])),
                 _percent(recovered(truth[0], *truth[2:])), "-"])
    rows.append(["video captioning BLEU-4, decoded over pre-training's tokens only (the demo's protocol)",
                 _f(value(demo, "video_captioning", "BLEU-4")), "-", "-", "-", "-", "-", "-"])
    _plot_tuning(bars, plots / "tuning.png")
    train, test = (Manifest.load(DATA / "videos" / split).num_samples for split in ("train", "test"))
    fraction = _recipe("toyworld-tiny-prompt-tune-video-caption").tasks[0].subset
    evaluated_clips = f"{test:,} clips" if p.limit is None else f"about {p.limit} of its {test:,} clips"
    lines = [
        "## 1. Prompt tuning on 1% against fine-tuning on all, on tasks pre-training never saw", "",
        "The papers: prompt tuning on 1% of a downstream task's data comes close to full fine-tuning (MSVD "
        "captioning recovers about 90% of fine-tuning's gain over zero-shot). Here the demo's model "
        f"(`{demo}`) is tuned on ToyWorld's video captioning and video-text retrieval, which pre-training never "
        f"trains: prompt tuning on {fraction:.0%} ({int(fraction * train)} of the {train:,} training clips, the "
        "same ones for both tasks: the subset is drawn from the seed) trains the reference's prompt parameters (10 "
        "deep prompts per layer, the `<|spe|>` bias, the LayerNorms, `ln_post`); fine-tuning trains everything on "
        f"all {train:,} clips. Test split: {evaluated_clips}, retrieval against each clip's first caption. "
        "Captions are decoded over the tokens of pre-training's texts and of the video captions, for all three "
        "(the demo decodes zero-shot over pre-training's only: the last row).", "",
        *_table(["metric", "zero-shot", "prompt-tuned, 1%", "prompt-tuned, 100%", "fine-tuned, 100%",
                 "gain recovered by PT 1% (goal 70%)", "by PT 100%", "paper (BASE): zero-shot / PT 1% / FT, "
                 "recovered"], rows, numbers=(1, 2, 3, 4, 5, 6)),
        "Prompt tuning on all the clips (same steps) is not a claim of the papers: it tells whether the 1% of "
        "data or the few parameters prompt tuning trains hold it back.", "",
        *(f"- {v}" for v in verdicts), "",
        f"![zero-shot, prompt-tuned and fine-tuned]({rel}/tuning.png)", ""]
    return lines


def _tuning_verdict(label: str, share: float | None, share_all: float | None, paper: str) -> str:
    """One line on the tuning claim for one metric: the goal met or not, and what holds prompt tuning back."""
    if share is None:
        return f"{label}: fine-tuning gained nothing over zero-shot, so there is no share to recover."
    line = f"{label}: prompt tuning on 1% " + (f"recovers {share:.0f}% of fine-tuning's gain" if share >= 0 else
                                                f"ends below zero-shot ({share:.0f}% of fine-tuning's gain)") + ", " + (
        f"the goal of 70% is met: agrees with the papers ({paper})." if share >= 70 else
        f"short of the goal of 70%: **contradicts the papers** ({paper}).")
    if share < 70 and share_all is not None:
        line += f" With the same steps on all the clips it recovers {share_all:.0f}%: " + (
            "more data closes the gap, so the 1% held it back." if share_all >= 70 else
            "more data does not close the gap, so the few parameters prompt tuning trains (in these few steps) "
            "hold it back.")
    return line


def _final_losses(runs: Sequence[Path], task: str) -> tuple[float, float] | None:
    """A training task's final loss (mean of its last 10 logs) and its rise above its lowest running mean (5 logs),
    each averaged over ``runs``; None when a run logged no loss for it."""
    finals, rises = [], []
    for run in runs:
        losses = curves(run, [task])[task][1]
        if not losses:
            return None
        smooth = _smooth(losses)
        finals.append(mean(losses[-10:]))
        rises.append(smooth[-1] - min(smooth))
    return mean(finals), mean(rises)


def _smooth(values: Sequence[float], k: int = 5) -> list[float]:
    """The running mean over the last ``k`` values."""
    return [mean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def moe_section(p: Plan, demo: Path, plots: Path, rel: str) -> list[str]:
    dense = [demo, p.runs / "dense-seed1"]
    moe = [p.runs / "moe-seed0", p.runs / "moe-seed1"]
    rows = []
    for task, metric, label, paper, pd, pm in TASKS:
        d = [value(r, task, metric) for r in dense]
        m = [value(r, task, metric) for r in moe]
        if None in d or None in m:
            rows.append([label, "-", "-", "-", "-", "not evaluated"])
            continue
        delta, noise = mean(m) - mean(d), max(spread(d), spread(m))
        paper_delta = None if pd is None else pm - pd
        rows.append([label, f"{mean(d):.1f} ± {spread(d):.1f} ({d[0]:.1f}, {d[1]:.1f})",
                     f"{mean(m):.1f} ± {spread(m):.1f} ({m[0]:.1f}, {m[1]:.1f})", f"{delta:+.1f}",
                     "-" if paper is None else f"{paper}: {pd} → {pm} ({pm - pd:+.1f})",
                     verdict(delta, noise, paper_delta)])
    truth_d = [true_recall(r, "image_text_retrieval", "images/test") for r in dense]
    truth_m = [true_recall(r, "image_text_retrieval", "images/test") for r in moe]
    if None not in truth_d + truth_m:
        rows.append(["image-text i2t R@1, true caption", f"{mean(truth_d):.1f} ± {spread(truth_d):.1f}",
                     f"{mean(truth_m):.1f} ± {spread(truth_m):.1f}", f"{mean(truth_m) - mean(truth_d):+.1f}", "-",
                     verdict(mean(truth_m) - mean(truth_d), max(spread(truth_d), spread(truth_m)), None)])
    _plot_curves({"dense, seed 0": dense[0], "dense, seed 1": dense[1], "MoE, seed 0": moe[0],
                  "MoE, seed 1": moe[1]}, plots / "curves-moe.png", "dense against attribute MoE")
    losses = []
    for task in TRAINED:
        d, m = (_final_losses(runs, task) for runs in (dense, moe))
        if d is not None and m is not None:
            losses.append([task, f"{d[0]:.2f}", f"{m[0]:.2f}", f"{d[1]:+.2f}", f"{m[1]:+.2f}"])
    return [
        "## 2. Dense against attribute-routed MoE", "",
        "The MoE paper: conditional MoE beats the dense model without tuning (ImageNet 79.2 → 80.3, MSVD "
        f"captioning 22.6 → 23.4). Here: `toyworld-tiny` against `toyworld-tiny-moe` (4 experts, top-2, in layers "
        f"0 and 2 of 3; attention and MLP linears), {p.steps(PRETRAIN_STEPS):,} steps each, seeds 0 and 1 "
        "(dense seed 0 "
        "is the demo's model). Equal active compute: attribute routing merges the two chosen experts' weights "
        "per segment, so each token goes through one linear of the dense model's size (the merge itself is the "
        "extra cost, docs/performance.md). Mean ± half the range over the two seeds, the two values in brackets; "
        "a difference within the larger spread is not resolved.", "",
        *_table(["task", "dense", "attribute MoE", "MoE − dense", "paper (BASE, no tuning)", "verdict"], rows,
                numbers=(1, 2, 3)),
        f"![training losses, dense against MoE]({rel}/curves-moe.png)", "",
        "Training loss at the end (the mean of the last 10 logs, both seeds) and how far it rose again from its "
        "lowest point (the running mean of 5 logs): a loss that rises while the others fall is a task losing "
        "to the others in the shared weights, the interference conditional MoE is meant to reduce.", "",
        *_table(["training task", "dense, final", "MoE, final", "dense, rise from lowest", "MoE, rise from lowest"],
                losses, numbers=(1, 2, 3, 4))]


def _routed(run: Path, task: str, metric: str) -> float | None:
    """A task's metric, or for task routing's refused (unseen) tasks the one with the borrowed experts."""
    got = value(run, task, metric)
    return got if got is not None else evaluated(run / "eval" / "borrowed" / task, metric)


def _task_means(run: Path) -> tuple[float | None, float | None]:
    """The mean of a run's metrics over the trained tasks and over the zero-shot ones (task routing: borrowed)."""
    seen = [value(run, task, metric) for task, metric, *_ in TASKS if task in TRAINED]
    unseen = [_routed(run, task, metric) for task, metric, *_ in TASKS if task not in TRAINED]
    return tuple(None if None in values else mean(values) for values in (seen, unseen))


def _routing_verdict(what: str, averages: dict[str, tuple[float | None, float | None]],
                     seeds: list[list[tuple[float | None, float | None]]], column: int) -> str:
    """Whether attribute routing has the best mean (``column`` 0: trained tasks, 1: zero-shot), against the noise of
    one run: the full range of such a mean over section 2's two seeds (dense or MoE, the larger)."""
    scored = {name: got[column] for name, got in averages.items() if name != "dense" and got[column] is not None}
    if "attribute" not in scored or len(scored) < 2:
        return f"- On the {what}: not every routing level has run."
    order = sorted(scored, key=scored.get, reverse=True)
    ranking = ", ".join(f"{n} {scored[n]:.1f}" for n in order)
    pairs = [[m[column] for m in pair] for pair in seeds if None not in [m[column] for m in pair]]
    if not pairs:
        return f"- On the {what}: {ranking}; section 2's seeds have not run, so there is no noise to judge by."
    noise = max(max(pair) - min(pair) for pair in pairs)
    rival = order[1] if order[0] == "attribute" else order[0]
    gap = scored["attribute"] - scored[rival]
    if abs(gap) <= noise:
        where = (f"ties {rival} ({abs(gap):.2f} apart)" if abs(gap) < 0.05 else
                 f"is {abs(gap):.1f} {'ahead of' if gap > 0 else 'behind'} {rival}")
        judged = f"attribute {where}, within the seeds' range of such a mean ({noise:.1f}): not resolved."
    elif gap > 0:
        judged = (f"attribute leads {rival} by {gap:.1f}, more than the seeds' range ({noise:.1f}): agrees with the "
                  "paper.")
    else:
        judged = (f"attribute is {-gap:.1f} behind {rival}, more than the seeds' range ({noise:.1f}): "
                  "**contradicts the paper** (attribute best).")
    return f"- On the {what} ({ranking}): {judged}"


def routing_section(p: Plan, times: dict[str, float], plots: Path, rel: str) -> list[str]:
    runs = {"dense": p.runs / "routing-dense", **{r: p.runs / f"routing-{r}" for r in ROUTINGS}}
    rows = []
    for task, metric, label, *_ in TASKS:
        row = [label]
        for name, run in runs.items():
            got, errors = results(run)
            shown = _f(got.get(task, {}).get(metric))
            if name == "task" and task in errors:
                via = evaluated(run / "eval" / "borrowed" / task, metric)
                shown = f"refused; {_f(via)} with {BORROWED[task]}'s experts"
            row.append(shown)
        rows.append(row)
    averages = {name: _task_means(run) for name, run in runs.items()}
    means = [[name, _f(seen), _f(unseen), _f(times.get(f"routing-{name}"), 0)]
             for name, (seen, unseen) in averages.items()]
    refusal = next(iter(results(runs["task"])[1].values()), "")
    _plot_curves(runs, plots / "curves-routing.png", "routing levels")
    # The noise of such a mean: how far it moved between section 2's two seeds (dense or MoE, the larger).
    seeds = [[_task_means(run) for run in pair] for pair in
             ([p.demo, p.runs / "dense-seed1"], [p.runs / "moe-seed0", p.runs / "moe-seed1"])]
    verdicts = [_routing_verdict(what, averages, seeds, column)
                for column, what in ((0, "trained tasks"), (1, "zero-shot tasks"))]
    return [
        "## 3. Routing levels", "",
        "The MoE paper: attribute routing is the best of the routing levels, and task routing cannot serve "
        f"unseen tasks. Here: `toyworld-tiny-moe` with `model.overrides.moe.routing` set, {p.steps(ROUTING_STEPS):,} "
        "steps each (fewer than the demo's, so lower numbers), seed 0, and the dense model at the same steps. "
        "Token and context routing are dropless top-2 with the balance loss (0.01) and z-loss (0.001); they run "
        "two experts' linears per token. One seed: section 2's spread (a few points) is the noise to read these "
        "by.", "",
        *_table(["metric", *runs], rows, numbers=range(1, len(runs) + 1)),
        "Means over the five trained tasks' metrics and over the three zero-shot ones (for task routing, with "
        "the borrowed experts), and each run's wall time (training and evaluation, seconds):", "",
        *_table(["routing", "trained tasks", "zero-shot tasks", "seconds"], means, numbers=(1, 2, 3)),
        *verdicts, "",
        *([f"Task routing on an unseen task, as `pretrain`'s evaluation reported it: \"{refusal}\". `evaluate "
           "--routing-task` then borrows a trained task's experts (colour from shape, video captioning from image "
           "captioning, video retrieval from image retrieval): the best a user of task routing can do.", ""]
          if refusal else []),
        f"![training losses by routing level]({rel}/curves-routing.png)", ""]


COLOURS = {"zero-shot": "C0", "prompt-tuned 1%": "C1", "fine-tuned 100%": "C2", "prompt-tuned 100%": "C3"}


def _plot_tuning(bars: dict[str, tuple], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ours = ["zero-shot", "prompt-tuned 1%", "prompt-tuned 100%", "fine-tuned 100%"]
    theirs = ["zero-shot", "prompt-tuned 1%", "fine-tuned 100%"]
    panels = (("ToyWorld (tiny, ours)", ours, lambda b: b[:4]), ("paper (BASE, MSVD)", theirs, lambda b: b[4]))
    for ax, (title, labels, pick) in zip(axes, panels, strict=True):
        width = 0.8 / len(labels)
        for j, label in enumerate(labels):
            heights = [pick(b)[j] or 0.0 for b in bars.values()]
            ax.bar([i + (j - (len(labels) - 1) / 2) * width for i in range(len(bars))], heights, width,
                   label=label, color=COLOURS[label])
        ax.set_xticks(range(len(bars)), [k.replace("video-text ", "").replace("video captioning ", "caption ")
                                         for k in bars])
        ax.set_title(title)
        ax.set_ylim(0, 100)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(runs: dict[str, Path], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TRAINED), figsize=(3.2 * len(TRAINED), 3.2))
    for name, run in runs.items():
        for ax, (task, (steps, losses)) in zip(axes, curves(run, TRAINED).items(), strict=True):
            ax.plot(steps, _smooth(losses), label=name, linewidth=1)
            ax.set_title(task.replace("_", " "), fontsize=9)
            ax.set_xlabel("step", fontsize=8)
    axes[0].set_ylabel("training loss")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


def report(p: Plan, out: Path) -> str:
    demo = p.demo
    plots = out.parent / out.stem
    plots.mkdir(parents=True, exist_ok=True)
    rel = plots.name
    times = json.loads((p.runs / "times.json").read_text()) if (p.runs / "times.json").is_file() else {}
    lines = [
        "# The papers' claims on ToyWorld", "",
        "Written by `make claims` (`benchmarks/claims.py`); every number below comes from the runs listed at the "
        "end, on this machine: " + _machine() + ". ToyWorld (docs/data.md) is a laptop-scale world: the models "
        "are the tiny preset (64 wide, 3 layers) trained for minutes, so the numbers are not the papers'; the "
        "question is whether each claim's direction holds. The papers' numbers are the BASE rows of the reference "
        "README's table (without tuning, prompt-tuned on 1%, fine-tuned; dense and MoE), as in docs/reproduce.md.",
        "",
        *tuning_section(p, demo, plots, rel),
        *moe_section(p, demo, plots, rel),
        *routing_section(p, times, plots, rel),
        "## The runs", "",
        f"Wall time of the runs below: {sum(times.get(j.key, 0.0) for j in p.jobs) / 60:.0f} minutes"
        + (" (the demo's model was `make demo`'s, `runs/toyworld-tiny`: its training is not counted)"
           if demo == DEMO else "") + ".", "",
        *_table(["run", "seconds", "command"],
                [[j.key, _f(times.get(j.key), 0), f"`{j.command}`"] for j in p.jobs], numbers=(1,)),
    ]
    out.write_text("\n".join(lines))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/claims"), help="where the runs go")
    parser.add_argument("--out", type=Path, default=Path("docs/claims.md"), help="the page (plots beside it)")
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
    p = plan(args.runs, args.scale, args.limit, chosen=choose_rates(search))
    if not args.report_only:
        run_jobs(p, args.runs / "times.json")
    if args.runs_only:
        return
    print(report(p, args.out))
    print(f"\nwrote {args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
