"""The `make demo` report: the ToyWorld results of a run against the targets of the main job.

    python benchmarks/demo_targets.py runs/toyworld-tiny --seconds 512
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

# (evaluation task, metric, target or None for "reported", chance level)
TARGETS = [
    ("shape_classification", "acc@1", 90.0, "12.5"),
    ("colour_classification", "acc@1", 40.0, "12.5 (zero-shot)"),
    ("image_text_retrieval", "i2t_R@1", 30.0, "0.1"),
    ("image_captioning", "BLEU-4", 25.0, "-"),
    ("motion_classification", "acc@1", 70.0, "14.3"),
    ("video_captioning", "BLEU-4", None, "- (zero-shot)"),
    ("video_text_retrieval", "i2t_R@1", None, "0.2 (zero-shot)"),
]
SECONDS = 600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--seconds", type=float, default=None, help="wall time of the demo after installation")
    args = parser.parse_args()
    summary = json.loads((args.run / "eval" / "final" / "summary.json").read_text())["results"]
    table = Table(title=f"ToyWorld demo: {args.run}")
    for column in ("task", "metric", "value", "target", "chance", "met"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, metric, target, chance in TARGETS:
        value = summary.get(task, {}).get(metric)
        shown = "-" if value is None else f"{value:.1f}"
        met = "reported" if target is None else ("yes" if value is not None and value >= target else "NO")
        table.add_row(task, metric, shown, "-" if target is None else f">= {target:g}", chance, met)
    if args.seconds is not None:
        table.add_row("whole demo", "seconds", f"{args.seconds:.0f}", f"<= {SECONDS}", "",
                      "yes" if args.seconds <= SECONDS else "NO")
    Console().print(table)


if __name__ == "__main__":
    main()
