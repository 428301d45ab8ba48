"""One evaluation task (a recipe's ``EvalTaskSpec``; ``uniperceiver evaluate`` builds one from its options) on a
converted split, for the command and for the training loop. Its paths are relative to ``data_root``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from uniperceiver_cli.data.corpus import vocabulary_of
from uniperceiver_cli.data.loader import make_loader
from uniperceiver_cli.data.shards import Manifest, split_source
from uniperceiver_cli.evaluate import runners
from uniperceiver_cli.evaluate.gather import gather
from uniperceiver_cli.evaluate.report import write_results
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.parallel.context import Context
from uniperceiver_cli.progress import terminal_progress
from uniperceiver_cli.task_types import TASKS
from uniperceiver_cli.text_files import read_lines


@dataclass
class Evaluation:
    spec: Any  # EvalTaskSpec (train/ imports evaluate/, not the other way)
    result: runners.EvalResult
    data: dict[str, Any]  # results.json's "data": the split's path, dataset and split, the loader's skip counts
    labels: list[str] | None  # the class names scored (classification)

    def write(self, out: Path, model: dict[str, Any], settings: dict[str, Any] | None = None) -> Path:
        """:func:`~uniperceiver_cli.evaluate.report.write_results` into ``out``; settings: the spec's by default."""
        return write_results(out, self.result, data=self.data, model=model, settings=settings or asdict(self.spec))


def caption_vocabulary(model: UniPerceiver, vocabulary: str, folders: Sequence[Path] = ()) -> torch.Tensor | None:
    """The token ids to decode captions over (None: all of them): those of ``folders``' texts, else with "trained"
    the set the model's caption task trained on (``model.caption_vocabulary``, when recorded)."""
    if folders:
        return vocabulary_of(list(folders))
    return model.caption_vocabulary if vocabulary == "trained" else None


def evaluate_task(model: UniPerceiver, spec: Any, data_root: Path = Path("."), *, num_workers: int = 0,
                  precision: str = "auto", len_penalty: float = 0.0, ctx: Context | None = None,
                  progress: bool = False) -> Evaluation:
    """Run one evaluation task through its family's runner, routed as task ``spec.name`` (task routing). With a
    ``ctx`` of several processes each evaluates its share of the split (``max_samples`` split between them too) and
    every process gets the metrics of the whole split (captioning: the main process). ``progress`` shows this
    process's samples done and the time left on stderr (on a terminal).

    Raises:
        ValueError: among others, the model routes by task and ``spec.name`` is none of its training tasks.
    """
    with model.routing_task(spec.name):
        return _evaluate(model, spec, data_root, num_workers=num_workers, precision=precision,
                         len_penalty=len_penalty, ctx=ctx or Context(), progress=progress)


def _evaluate(model: UniPerceiver, spec: Any, data_root: Path, *, num_workers: int, precision: str,
              len_penalty: float, ctx: Context, progress: bool) -> Evaluation:
    directory = split_source(data_root, spec.data)
    manifest = Manifest.load(directory)
    family, names = TASKS[spec.type].family, None
    if family == "vqa":
        if spec.labels:
            raise ValueError(f"evaluation {spec.name}: a VQA split names its answer set; labels does not apply")
        names = manifest.label_names(spec.label_set)
    loader = make_loader(directory, task=spec.type, batch_size=spec.batch_size, train=False,
                         image_size=model.config.image_size, num_frames=spec.num_frames, num_views=spec.views,
                         num_clips=spec.clips, max_text_len=spec.max_text_len, num_workers=num_workers,
                         label_set=spec.label_set, frame_stride=spec.frame_stride, rank=ctx.rank,
                         world_size=ctx.world_size, answers=names or ())
    share = None if spec.max_samples is None else -(-spec.max_samples // ctx.world_size)
    batches = runners.limited(loader, share)
    if progress:
        total = -(-manifest.num_samples // ctx.world_size)
        batches = with_progress(batches, min(total, share or total), f"{spec.name}" +
                                (f" (process {ctx.rank} of {ctx.world_size})" if ctx.world_size > 1 else ""))
    if family == "classification":
        truth = manifest.label_names(spec.label_set) if manifest.classes or spec.label_set else None
        names = read_lines(data_root / spec.labels, "labels") if spec.labels else manifest.label_names(spec.label_set)
        result = runners.run_classification(model, batches, names, templates=spec.templates, truth_names=truth,
                                            precision=precision, task=spec.name, ctx=ctx)
    elif family == "retrieval":
        result = runners.run_retrieval(model, batches, max_text_len=spec.max_text_len,
                                       captions_per_item=spec.captions_per_item, precision=precision, task=spec.name,
                                       ctx=ctx)
    elif family == "caption":
        vocab_ids = caption_vocabulary(model, spec.vocabulary, [data_root / f for f in spec.vocabulary_from])
        result = runners.run_captioning(model, batches, beam_size=spec.beam_size, max_len=spec.max_len,
                                        len_penalty=len_penalty, vocab_ids=vocab_ids, precision=precision,
                                        task=spec.name, ctx=ctx)
    elif family == "text_classification":
        if spec.labels:
            raise ValueError(f"evaluation {spec.name}: a text classification split names its label words; labels "
                             f"does not apply")
        names = manifest.label_names(spec.label_set)
        result = runners.run_text_classification(model, batches, names, precision=precision, task=spec.name,
                                                  ctx=ctx)
    elif family == "vqa":
        result = runners.run_vqa(model, batches, names, precision=precision, task=spec.name, ctx=ctx)
    else:
        vocab_ids = vocabulary_of([data_root / f for f in spec.vocabulary_from]) if spec.vocabulary_from else None
        result = runners.run_mlm(model, batches, vocab_ids=vocab_ids, precision=precision, task=spec.name, ctx=ctx)
    skipped: Counter[str] = Counter()
    for part in gather(dict(loader.skipped), ctx):
        skipped.update(part)
    data = {"path": str(directory), "dataset": manifest.dataset, "split": manifest.split, "skipped": dict(skipped),
            "processes": ctx.world_size}
    return Evaluation(spec, result, data, names)


def with_progress(batches: Iterable[dict[str, Any]], total: int, label: str) -> Iterator[dict[str, Any]]:
    """``batches`` as they are, with the samples done, the time taken and the time left on stderr (on a terminal
    only: nothing goes into a log)."""
    from rich.console import Console

    with terminal_progress(label, Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total)
        for batch in batches:
            yield batch
            bar.advance(task, len(batch["keys"]))
