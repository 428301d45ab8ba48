"""The `make demo` report: the ToyWorld results of a run against the targets of the main job.

    python benchmarks/demo_targets.py runs/toyworld-tiny --seconds 512

Image-text retrieval is reported twice: the strict R@1 (the image's own caption ranks first; the target), with
the ceiling a model reaches that ranks every caption true of an image first, and R@1 where the top caption is true
of the image, as ToyWorld decides from each image's scene (``toyworld.true_captions``). The demo's wall time is a
benchmark figure against the 10-minute goal, not a target: two 2-core machines differ by up to 2x (a 64-image
shape step: 36 ms on one, 65 ms on another).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from uniperceiver_cli.data import toyworld
from uniperceiver_cli.data.shards import read_metas

# (evaluation task, metric, target or None for "reported", chance level)
TARGETS = [
    ("shape_classification", "acc@1", 85.0, "12.5"),
    ("colour_classification", "acc@1", 40.0, "12.5 (zero-shot)"),
    ("image_text_retrieval", "i2t_R@1", 15.0, "0.1"),
    ("image_captioning", "BLEU-4", 25.0, "-"),
    ("motion_classification", "acc@1", 70.0, "14.3"),
    ("mlm", "masked_acc", None, "-"),
    ("video_captioning", "BLEU-4", None, "- (zero-shot)"),
    ("video_text_retrieval", "i2t_R@1", None, "0.2 (zero-shot)"),
    ("vqa", "vqa_accuracy", None, f"{100 / len(toyworld.VQA_ANSWERS):.1f} (zero-shot)"),  # a uniform answer
]
SECONDS = 600  # the goal for the whole demo on the 2-core dev box


def retrieval_truth(run: Path, task: str) -> dict[str, float] | None:
    """The true-caption R@1 of a retrieval task of the run's final evaluation and the strict R@1's ceiling, or
    None when the task was not evaluated."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    spec = next((t for t in config["evaluation"]["tasks"] if t["name"] == task), None)
    predictions = run / "eval" / "final" / task / "predictions.jsonl"
    if spec is None or not predictions.is_file():
        return None
    best = {row["key"]: row["best_text"] for row in map(json.loads, predictions.read_text().splitlines())}
    metas = {k: v for k, v in read_metas(Path(config["data_root"]) / spec["data"]).items() if k in best}
    return {"true_R@1": toyworld.true_caption_recall(best, metas),
            "ceiling": toyworld.strict_recall_ceiling(metas, spec.get("captions_per_item"))}


Row = tuple[str, str, float | None, float | None, float | None, str, str]


def rows(run: Path) -> list[Row]:
    """(task, metric, value, target, ceiling, chance, met) for every target of a finished run."""
    summary: dict[str, Any] = json.loads((run / "eval" / "final" / "summary.json").read_text())["results"]
    out = []
    for task, metric, target, chance in TARGETS:
        value = summary.get(task, {}).get(metric)
        met = "reported" if target is None else ("yes" if value is not None and value >= target else "NO")
        truth = retrieval_truth(run, task) if task.endswith("retrieval") else None
        out.append((task, metric, value, target, truth and truth["ceiling"], chance, met))
        if truth is not None:
            out.append((task, f"{metric}, true caption", truth["true_R@1"], None, None, chance, "reported"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--seconds", type=float, default=None, help="wall time of the demo after installation")
    args = parser.parse_args()
    table = Table(title=f"ToyWorld demo: {args.run}")
    for column in ("task", "metric", "value", "target", "ceiling", "chance", "met"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right", no_wrap=True)
    for task, metric, value, target, ceiling, chance, met in rows(args.run):
        table.add_row(task, metric, "-" if value is None else f"{value:.1f}",
                      "-" if target is None else f">= {target:g}", "-" if ceiling is None else f"{ceiling:.1f}",
                      chance, met)
    if args.seconds is not None:
        table.add_row("whole demo", "seconds", f"{args.seconds:.0f}", f"goal {SECONDS}", "-", "", "benchmark")
    console = Console()
    console.width = max(console.width, 120)  # a log file or pipe gets 80 columns: the rows would fold
    console.print(table)


if __name__ == "__main__":
    main()
