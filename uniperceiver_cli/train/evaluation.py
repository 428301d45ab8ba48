"""The recipe's evaluation section, run through the evaluation runners (during and after training)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from uniperceiver_cli.data.corpus import vocabulary_of
from uniperceiver_cli.data.loader import make_loader
from uniperceiver_cli.data.shards import Manifest
from uniperceiver_cli.evaluate import runners
from uniperceiver_cli.evaluate.report import write_results
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.train.recipe import EvalTaskSpec


def evaluate_task(model: UniPerceiver, spec: EvalTaskSpec, data_root: Path, out: Path | None = None,
                  num_workers: int = 0) -> runners.EvalResult:
    """Evaluate one recipe evaluation task; with ``out``, write its results.json and predictions.jsonl."""
    directory = data_root / spec.data
    manifest = Manifest.load(directory)
    loader = make_loader(directory, task=spec.type, batch_size=spec.batch_size, train=False,
                         image_size=model.config.image_size, num_frames=spec.num_frames, num_views=spec.views,
                         num_clips=spec.clips,
                         max_text_len=spec.max_text_len, num_workers=num_workers, label_set=spec.label_set,
                         frame_stride=spec.frame_stride,
                         rank=0, world_size=1)
    batches = runners.limited(loader, spec.max_samples)
    kind = spec.type
    if kind.endswith("_classification"):
        names = truth = None
        if manifest.classes or spec.label_set:
            names = truth = manifest.label_names(spec.label_set)
        if spec.labels:
            names = [line.strip() for line in (data_root / spec.labels).read_text().splitlines() if line.strip()]
        if names is None:
            raise ValueError(f"evaluation {spec.name}: {spec.data} names no classes; set labels")
        result = runners.run_classification(model, batches, names, templates=spec.templates, truth_names=truth,
                                            task=spec.name)
    elif kind.endswith("_retrieval"):
        result = runners.run_retrieval(model, batches, max_text_len=spec.max_text_len,
                                       captions_per_item=spec.captions_per_item, task=spec.name)
    elif kind.endswith("_caption"):
        # As `evaluate`: the tokens the model's caption task trained on (None when it trained on all) by default.
        if spec.vocabulary_from:
            vocab_ids = vocabulary_of([data_root / f for f in spec.vocabulary_from])
        else:
            vocab_ids = model.caption_vocabulary if spec.vocabulary == "trained" else None
        result = runners.run_captioning(model, batches, beam_size=spec.beam_size, max_len=spec.max_len,
                                        vocab_ids=vocab_ids, task=spec.name)
    else:
        result = runners.run_mlm(model, batches, task=spec.name)
    if out is not None:
        write_results(out / spec.name, result, data={"path": str(directory), "dataset": manifest.dataset,
                                                      "split": manifest.split, "skipped": dict(loader.skipped)},
                      model={"path": None, "note": "the model being trained"}, settings=asdict(spec))
    return result


def print_summary(results: dict[str, dict[str, float]], title: str) -> None:
    """One table row per evaluation task with its metrics."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("task", no_wrap=True)
    table.add_column("metrics")
    for name, metrics in results.items():
        table.add_row(name, "  ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
    Console().print(table)
