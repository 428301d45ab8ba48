"""``uniperceiver prepare-data``: convert a data set from its on-disk layout into WebDataset shards.

Every command writes each split to ``OUT/<split>/`` (``shard-*.tar``, their stats and ``manifest.json``),
resumes an interrupted run (finished shards are kept), and prints a table per split.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

from uniperceiver_cli.cli.common import user_errors
from uniperceiver_cli.data.shards import Manifest
from uniperceiver_cli.data.sources import (
    coco,
    flickr30k,
    glue,
    image_text,
    imagenet21k,
    kinetics,
    msvd,
    text,
    visual_genome,
    vqa,
)
from uniperceiver_cli.data.sources import imagenet as imagenet1k
from uniperceiver_cli.data.sources.common import Conversion

app = typer.Typer(help="Convert a data set into WebDataset shards: OUT/<split>/shard-*.tar and manifest.json.",
                  no_args_is_help=True)

OUT = typer.Option(..., "--out", "-o", help="Output folder; each split goes to OUT/<split>/.")
MIN_SHARDS = typer.Option(8, "--min-shards", min=1,
                          help="At least this many shards per split (fewer only with fewer samples): "
                               "set it to training processes x data-loader workers.")
MAX_PER_SHARD = typer.Option(1000, "--max-per-shard", min=1, help="At most this many samples a shard.")
WORKERS = typer.Option(1, "--workers", min=1, help="Processes converting shards in parallel.")
NO_PROGRESS = typer.Option(False, "--no-progress", help="No progress bar.")
SELECT = typer.Option(None, "--split", help="Convert only this split (repeat for several); default: all found.")
SPLIT_NAME = typer.Option("train", "--split", help="Split name.")
CLASS_NAMES = typer.Option(None, "--class-names", help="Class names, one a line in index order.")
IMAGES = typer.Option(None, "--images", help="Folder the image paths are relative to (default: the list's folder).")
VIDEOS = typer.Option(None, "--videos", help="Folder the videos are under (default: the list's folder).")
NAME_HELP = "Data set name in the manifest."


class Size(str, Enum):
    """ToyWorld sizes."""

    tiny = "tiny"
    default = "default"


def _convert(plan: Callable[[], Conversion | list[Conversion]], out: Path, min_shards: int, max_per_shard: int,
             workers: int, no_progress: bool) -> None:
    with user_errors():
        planned = plan()
        for conversion in planned if isinstance(planned, list) else [planned]:
            directory = out / conversion.manifest.split
            manifest = conversion.write(directory, min_shards=min_shards, max_per_shard=max_per_shard,
                                        workers=workers, progress=not no_progress)
            _report(manifest, str(directory))


def _report(manifest: Manifest, where: str) -> None:
    title = f"{manifest.dataset} / {manifest.split}"
    table = Table(title=title, min_width=cell_len(title))  # a narrower table would fold the title mid-word
    table.add_column("")
    table.add_column(where, justify="right", overflow="fold")  # a path has no spaces: fold it, not cut it
    table.add_row("samples", f"{manifest.num_samples:,}")
    table.add_row("shards", f"{len(manifest.shards):,}")
    for reason, count in manifest.skipped.items() or [("", 0)]:
        table.add_row(f"skipped: {reason}" if reason else "skipped", f"{count:,}")
    Console().print(table)


@app.command()
def imagenet(
    src: Path = typer.Argument(..., help="SRC/<split>/<class>/<image>, or SRC/meta/<split>.txt + SRC/<split>/."),
    out: Path = OUT, split: list[str] | None = SELECT, class_names: Path | None = CLASS_NAMES,
    name: str = typer.Option("imagenet", "--name", help=NAME_HELP), min_shards: int = MIN_SHARDS,
    max_per_shard: int = MAX_PER_SHARD, workers: int = WORKERS, no_progress: bool = NO_PROGRESS,
) -> None:
    """ImageNet-1k from class folders or the reference's meta lists ('relative_path label' lines)."""
    _convert(lambda: imagenet1k.plan(src, splits=split, class_names=class_names, name=name),
             out, min_shards, max_per_shard, workers, no_progress)


@app.command("imagenet21k")
def imagenet_21k(
    src: Path = typer.Argument(..., help="The folder holding <wnid>/<wnid>_<idx>.JPEG."), out: Path = OUT,
    filelist: Path | None = typer.Option(None, "--filelist",
                                         help=f"The file list (default: SRC/{imagenet21k.FILELIST})."),
    class_names: Path | None = CLASS_NAMES, split: str = SPLIT_NAME,
    name: str = typer.Option("imagenet21k", "--name", help=NAME_HELP), min_shards: int = MIN_SHARDS,
    max_per_shard: int = MAX_PER_SHARD, workers: int = WORKERS, no_progress: bool = NO_PROGRESS,
) -> None:
    """ImageNet-21k from the reference's file list ('wnid idx class_id' lines)."""
    _convert(lambda: imagenet21k.plan(src, filelist=filelist, class_names=class_names, split=split, name=name),
             out, min_shards, max_per_shard, workers, no_progress)


@app.command("coco")
def coco_captions(
    annotations: list[Path] = typer.Argument(..., help="dataset_coco.json (Karpathy) and/or captions_*.json."),
    out: Path = OUT, images: Path | None = IMAGES, split: list[str] | None = SELECT,
    name: str = typer.Option("coco", "--name", help=NAME_HELP), min_shards: int = MIN_SHARDS,
    max_per_shard: int = MAX_PER_SHARD, workers: int = WORKERS, no_progress: bool = NO_PROGRESS,
) -> None:
    """MS-COCO captions: one sample per image with all its captions (restval goes into train)."""
    _convert(lambda: coco.plan(annotations, images, splits=split, name=name),
             out, min_shards, max_per_shard, workers, no_progress)


@app.command("flickr30k")
def flickr30k_captions(
    annotations: Path = typer.Argument(..., help="dataset_flickr30k.json (Karpathy)."),
    out: Path = OUT, images: Path | None = IMAGES, split: list[str] | None = SELECT,
    name: str = typer.Option("flickr30k", "--name", help=NAME_HELP), min_shards: int = MIN_SHARDS,
    max_per_shard: int = MAX_PER_SHARD, workers: int = WORKERS, no_progress: bool = NO_PROGRESS,
) -> None:
    """Flickr30k captions: one sample per image with all its captions."""
    _convert(lambda: flickr30k.plan(annotations, images, splits=split, name=name),
             out, min_shards, max_per_shard, workers, no_progress)


@app.command("image-text")
def image_text_pairs(
    lists: list[Path] = typer.Argument(..., help=".tsv (path<TAB>caption), .jsonl/.json lines, or a .json dict."),
    out: Path = OUT, images: Path | None = IMAGES, split: str = SPLIT_NAME,
    name: str = typer.Option("image_text", "--name", help=NAME_HELP + " (cc3m, cc12m, sbu, yfcc...)"),
    min_shards: int = MIN_SHARDS, max_per_shard: int = MAX_PER_SHARD, workers: int = WORKERS,
    no_progress: bool = NO_PROGRESS,
) -> None:
    """Image-text pairs (CC3M, CC12M, SBU, YFCC): one sample per line, images in folders or zips."""
    _convert(lambda: image_text.plan(lists, images, split=split, name=name),
             out, min_shards, max_per_shard, workers, no_progress)


@app.command("visual-genome")
def visual_genome_captions(
    annotations: Path = typer.Argument(..., help="vg_captions_128filter.json."),
    out: Path = OUT, images: Path | None = IMAGES, split: str = SPLIT_NAME,
    name: str = typer.Option("visual_genome", "--name", help=NAME_HELP), min_shards: int = MIN_SHARDS,
    max_per_shard: int = MAX_PER_SHARD, workers: int = WORKERS, no_progress: bool = NO_PROGRESS,
) -> None:
    """Visual Genome region captions: one sample per image with all its captions."""
    _convert(lambda: visual_genome.plan(annotations, images, split=split, name=name),
             out, min_shards, max_per_shard, workers, no_progress)


@app.command("kinetics")
def kinetics_videos(
    sources: list[Path] = typer.Argument(..., help="Annotation CSVs, or one SRC/<split>/<label>/<video> tree."),
    out: Path = OUT, videos: Path | None = VIDEOS, split: list[str] | None = SELECT,
    class_names: Path | None = CLASS_NAMES, name: str = typer.Option("kinetics", "--name", help=NAME_HELP),
    min_shards: int = MIN_SHARDS, max_per_shard: int = MAX_PER_SHARD, workers: int = WORKERS,
    no_progress: bool = NO_PROGRESS,
) -> None:
    """Kinetics-400/700 and Moments in Time: video classification, classes sorted by name."""
    _convert(lambda: kinetics.plan(sources, videos, splits=split, class_names=class_names, name=name),
             out, min_shards, max_per_shard, workers, no_progress)


@app.command("msvd")
def msvd_captions(
    annotations: list[Path] = typer.Argument(..., help="COCO-style caption jsons, one split each."), out: Path = OUT,
    videos: Path | None = VIDEOS, split: list[str] | None = SELECT,
    name: str = typer.Option("msvd", "--name", help=NAME_HELP + " (msrvtt for MSRVTT)"), min_shards: int = MIN_SHARDS,
    max_per_shard: int = MAX_PER_SHARD, workers: int = WORKERS, no_progress: bool = NO_PROGRESS,
) -> None:
    """MSVD and MSRVTT video captions: one sample per video with all its captions."""
    _convert(lambda: msvd.plan(annotations, videos, splits=split, name=name),
             out, min_shards, max_per_shard, workers, no_progress)


@app.command("text")
def text_corpus(
    sources: list[Path] = typer.Argument(..., help="Text files or folders of them, one sentence/paragraph a line."),
    out: Path = OUT, min_words: int = typer.Option(128, "--min-words", min=1, help="Least words in a passage."),
    split: str = SPLIT_NAME,
    name: str = typer.Option("text", "--name", help=NAME_HELP + " (bookswiki...)"), min_shards: int = MIN_SHARDS,
    max_per_shard: int = MAX_PER_SHARD, workers: int = WORKERS, no_progress: bool = NO_PROGRESS,
) -> None:
    """A plain-text corpus (BookCorpus, Wikipedia) as passages for masked language modelling."""
    _convert(lambda: text.plan(sources, min_words=min_words, split=split, name=name),
             out, min_shards, max_per_shard, workers, no_progress)


@app.command("glue")
def glue_tasks(
    source: Path = typer.Argument(..., help="The GLUE folder: one folder per task holding its TSV files."),
    out: Path = OUT, task: list[str] | None = typer.Option(None, "--task", help="Convert only this task "
                                                           "(repeatable; default: every task folder found)."),
    min_shards: int = MIN_SHARDS, max_per_shard: int = MAX_PER_SHARD, workers: int = WORKERS,
    no_progress: bool = NO_PROGRESS,
) -> None:
    """GLUE (SST-2, CoLA, RTE, MRPC, QQP, QNLI, MNLI) as cloze prompts for text classification: OUT/<TASK>/<split>."""
    with user_errors():
        tasks = task or [name for name in glue.TASKS if (source / name).is_dir()]
        if not tasks:
            raise ValueError(f"{source} holds no GLUE task folder ({', '.join(glue.TASKS)})")
    for name in tasks:
        _convert(lambda name=name: glue.plan(source / name, name), out / name, min_shards, max_per_shard, workers,
                 no_progress)


@app.command("vqa")
def vqa_questions(
    source: Path = typer.Argument(..., help="The folder of the official v2_OpenEnded_mscoco_<split>_questions.json and "
                                            "v2_mscoco_<split>_annotations.json."),
    images: Path = typer.Option(..., "--images", help="The COCO images: IMAGES/<split>/COCO_<split>_<id>.jpg or "
                                                      "IMAGES/COCO_<split>_<id>.jpg."),
    out: Path = OUT, split: list[str] | None = SELECT,
    answers: Path | None = typer.Option(None, "--answers", help="The answer vocabulary, one normalised answer a line "
                                                                "(e.g. an earlier OUT/answers.txt); default: built "
                                                                "from the converted splits."),
    min_answer_count: int | None = typer.Option(None, "--min-answer-count", min=1,
                                                help=f"Build the vocabulary from the answers given at least this "
                                                     f"many times (default {vqa.MIN_ANSWER_COUNT})."),
    hold_out: int = typer.Option(0, "--hold-out", min=0, help="Move the last N questions of --hold-out-from to "
                                                              f"split {vqa.HOLD_OUT_SPLIT}."),
    hold_out_from: str = typer.Option("val2014", "--hold-out-from", help="The split --hold-out takes from."),
    visual_genome_qa: Path | None = typer.Option(None, "--visual-genome-qa", help="Visual Genome's "
                                                 f"question_answers.json: adds split {vqa.VG_SPLIT} (for training)."),
    visual_genome_images: Path | None = typer.Option(None, "--visual-genome-images", help="The Visual Genome images: "
                                                     "DIR/<id>.jpg, DIR/VG_100K/<id>.jpg or DIR/VG_100K_2/<id>.jpg."),
    name: str = typer.Option("vqa", "--name", help=NAME_HELP), min_shards: int = MIN_SHARDS,
    max_per_shard: int = MAX_PER_SHARD, workers: int = WORKERS, no_progress: bool = NO_PROGRESS,
) -> None:
    """VQA v2 (and Visual Genome QA): one sample per question with its answers' soft scores over an answer
    vocabulary, which OUT/answers.txt keeps."""
    def plan() -> list[Conversion]:
        if answers is not None and min_answer_count is not None:
            raise ValueError("give --answers or --min-answer-count, not both")
        conversions = vqa.plan(source, images, splits=split, answers=answers,
                               min_answer_count=min_answer_count or vqa.MIN_ANSWER_COUNT, hold_out=hold_out,
                               hold_out_from=hold_out_from, visual_genome_qa=visual_genome_qa,
                               visual_genome_images=visual_genome_images, name=name)
        vocabulary, kept = conversions[0].manifest.classes or [], out / vqa.ANSWERS_FILE
        if kept.is_file() and kept.read_text(encoding="utf-8").splitlines() != vocabulary:
            raise ValueError(f"{kept} holds another answer set, which the splits already there index; convert more "
                             f"splits with --answers {kept}, or into a new folder")
        vqa.write_answers(kept, vocabulary)
        return conversions

    _convert(plan, out, min_shards, max_per_shard, workers, no_progress)


@app.command("toyworld")
def toyworld(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder; ToyWorld's data sets and splits go under it."),
    size: Size = typer.Option(Size.default, "--size", help="How many samples."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same data."),
    image_size: int = typer.Option(64, "--image-size", min=1, help="Image side in pixels."),
    num_frames: int = typer.Option(8, "--num-frames", min=1, help="Frames a video clip."),
    min_shards: int = MIN_SHARDS, workers: int = WORKERS, no_progress: bool = NO_PROGRESS,
) -> None:
    """ToyWorld: a small synthetic data set for every task, generated (no download)."""
    from uniperceiver_cli.data import toyworld as toy  # imported here: only this command needs it

    with user_errors():
        manifests = toy.generate(out, size=size.value, seed=seed, image_size=image_size, num_frames=num_frames,
                                 min_shards=min_shards, workers=workers, progress=not no_progress)
        for key, manifest in manifests.items():
            _report(manifest, str(out / key))
