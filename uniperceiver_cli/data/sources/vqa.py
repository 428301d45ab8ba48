"""VQA v2 in its official layout: ``v2_OpenEnded_mscoco_<split>_questions.json`` and
``v2_mscoco_<split>_annotations.json`` per split, with the COCO images, one sample per question. The targets are
the official soft scores of the answers in an answer vocabulary (built from the annotations, or given); Visual
Genome's ``question_answers.json`` may add a training split ``vg``. Splits without annotations (test2015) are not
converted."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from uniperceiver_cli.data.shards import Manifest, Sample, Skip
from uniperceiver_cli.data.sources.common import Conversion, Item, LayoutError, keyed, load_json, read_image, require
from uniperceiver_cli.data.vqa_answers import answer_scores, normalise_answer
from uniperceiver_cli.task_types import task_names

QUESTIONS = "v2_OpenEnded_mscoco_{}_questions.json"
ANNOTATIONS = "v2_mscoco_{}_annotations.json"
QUESTIONS_LAYOUT = f"{QUESTIONS.format('<split>')} = {{'questions': [{{'question_id', 'image_id', 'question'}}]}}"
ANNOTATIONS_LAYOUT = (f"{ANNOTATIONS.format('<split>')} = {{'annotations': [{{'question_id', 'answers': "
                      "[{'answer'}], 'multiple_choice_answer', 'answer_type', 'question_type'}]}")
LAYOUT = f"SOURCE/{QUESTIONS.format('<split>')} and SOURCE/{ANNOTATIONS.format('<split>')} (the official VQA v2 files)"
IMAGES_LAYOUT = "a folder of COCO images: IMAGES/<split>/COCO_<split>_<image_id:012d>.jpg or IMAGES/COCO_<split>_..."
VG_LAYOUT = ("Visual Genome's question_answers.json = [{'id': image_id, 'qas': [{'qa_id', 'image_id', 'question', "
             "'answer'}]}]")
MIN_ANSWER_COUNT = 9  # the standard VQA v2 preprocessing: 3,129 answers over train2014 + val2014
HOLD_OUT_SPLIT = "minival"
VG_SPLIT = "vg"
ANSWERS_FILE = "answers.txt"


class Question(NamedTuple):
    """One question (or Visual Genome QA) of a split."""

    id: int
    image_id: int
    text: str  # whitespace collapsed


class Annotation(NamedTuple):
    """A question's human answers (raw), its most common answer, and its types."""

    answers: tuple[str, ...]
    answer: str  # multiple_choice_answer
    answer_type: str | None
    question_type: str | None


def plan(source: Path, images: Path, *, splits: Sequence[str] | None = None, answers: Path | None = None,
         min_answer_count: int = MIN_ANSWER_COUNT, hold_out: int = 0, hold_out_from: str = "val2014",
         visual_genome_qa: Path | None = None, visual_genome_images: Path | None = None,
         name: str = "vqa") -> list[Conversion]:
    """One conversion per split with both files, one sample per question (file order), then ``minival`` (the held
    out questions) and ``vg`` (Visual Genome QA) when asked for; every manifest has the answer vocabulary as classes.

    Args:
        source: the folder of the question and annotation jsons.
        images: the COCO images (:data:`IMAGES_LAYOUT`).
        splits: only these splits (default: all with both files).
        answers: the answer vocabulary, one answer a line, taken as given; default: built from the converted
            splits' annotations (:func:`build_vocabulary` with ``min_answer_count``).
        hold_out: the last this many questions of ``hold_out_from`` go to split ``minival`` instead.
        visual_genome_qa: Visual Genome's ``question_answers.json``, with its images under ``visual_genome_images``.
        name: the data set name in the manifests.
    """
    chosen = find_splits(source, splits)
    images = require(images, IMAGES_LAYOUT)
    if hold_out and hold_out_from not in chosen:
        raise LayoutError(f"--hold-out-from {hold_out_from}: not a converted split ({', '.join(chosen)})")
    if (visual_genome_qa is None) != (visual_genome_images is None):
        raise ValueError("--visual-genome-qa and --visual-genome-images go together")
    questions = {split: read_split(source, split) for split in chosen}
    if answers is None:
        vocabulary = build_vocabulary([a for qs in questions.values() for _, a in qs if a], min_answer_count)
        origin = f"built from {', '.join(chosen)} (min count {min_answer_count})"
    else:
        vocabulary, origin = read_answers(answers), str(answers)
    index = {answer: i for i, answer in enumerate(vocabulary)}

    def conversion(split: str, items: list[Item], files: str, make: Callable[[dict[str, int], Item], Sample]
                   ) -> Conversion:
        manifest = Manifest(dataset=name, split=split, modality="image", tasks=task_names("image", "vqa"),
                            source=files, classes=vocabulary,
                            extra={"questions": len(items), "answer_vocabulary": origin})
        return Conversion(manifest, keyed(items), partial(make, index))

    out = []
    for split in chosen:
        locate = finder([images / split, images])
        items = [question_item(q, a, locate(f"COCO_{split}_{q.image_id:012d}.jpg")) for q, a in questions[split]]
        files = f"{source / QUESTIONS.format(split)}, {source / ANNOTATIONS.format(split)}"
        kept, held = split_off(items, hold_out if split == hold_out_from else 0, split)
        out.append(conversion(split, kept, files, question_sample))
        if held:
            out.append(conversion(HOLD_OUT_SPLIT, held, files, question_sample))
    if visual_genome_qa is not None and visual_genome_images is not None:
        locate = finder([require(visual_genome_images, "a folder of Visual Genome images"),
                         visual_genome_images / "VG_100K", visual_genome_images / "VG_100K_2"])
        qas = read_visual_genome(visual_genome_qa)
        items = [question_item(q, a, locate(f"{q.image_id}.jpg"), "qa") for q, a in qas]
        out.append(conversion(VG_SPLIT, items, str(visual_genome_qa), visual_genome_sample))
    return out


def split_off(items: list[Item], count: int, split: str) -> tuple[list[Item], list[Item]]:
    """The items but the last ``count``, and those last ``count``."""
    if count > len(items):
        raise LayoutError(f"--hold-out {count}: {split} has only {len(items)} questions")
    return items[:len(items) - count], items[len(items) - count:]


def find_splits(source: Path, wanted: Sequence[str] | None = None) -> list[str]:
    """The splits of ``source`` with both a questions and an annotations file (sorted), or ``wanted`` (each checked
    to have both)."""
    if not source.is_dir():
        raise LayoutError(f"{source} is not a folder; expected {LAYOUT}")
    prefix, suffix = QUESTIONS.split("{}")
    stems = (path.name.removeprefix(prefix).removesuffix(suffix) for path in source.glob(QUESTIONS.format("*")))
    found = sorted(split for split in stems if (source / ANNOTATIONS.format(split)).is_file())
    if not found:
        raise LayoutError(f"{source} holds no split with both files; expected {LAYOUT}")
    for split in wanted or ():
        if split not in found:
            raise LayoutError(f"no split {split!r} in {source}: it needs {QUESTIONS.format(split)} and "
                              f"{ANNOTATIONS.format(split)} (splits found: {', '.join(found)})")
    return list(dict.fromkeys(wanted)) if wanted else found


@contextlib.contextmanager
def _fields(path: Path, layout: str) -> Iterator[None]:
    """A missing or malformed field of ``path`` becomes a layout error naming ``layout``."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LayoutError(f"{path}: missing or malformed field {e}; expected {layout}") from e


def _records(path: Path, field: str, layout: str) -> list[Any]:
    """The list under ``field`` of a JSON object file."""
    data = load_json(path, layout)
    if not isinstance(data, dict) or not isinstance(data.get(field), list):
        raise LayoutError(f"{path} has no {field!r} list; expected {layout}")
    return data[field]


def _text(text: Any) -> str:
    return " ".join(str(text).split())


def read_split(source: Path, split: str) -> list[tuple[Question, Annotation | None]]:
    """A split's questions in file order, each with its annotation (None when the annotations lack it)."""
    questions_path, annotations_path = source / QUESTIONS.format(split), source / ANNOTATIONS.format(split)
    records = _records(annotations_path, "annotations", ANNOTATIONS_LAYOUT)
    with _fields(annotations_path, ANNOTATIONS_LAYOUT):
        annotations = {int(a["question_id"]): Annotation(tuple(str(h["answer"]) for h in a["answers"]),
                                                         str(a["multiple_choice_answer"]), a.get("answer_type"),
                                                         a.get("question_type")) for a in records}
    records = _records(questions_path, "questions", QUESTIONS_LAYOUT)
    with _fields(questions_path, QUESTIONS_LAYOUT):
        return [(Question(int(q["question_id"]), int(q["image_id"]), _text(q["question"])),
                 annotations.get(int(q["question_id"]))) for q in records]


def read_visual_genome(path: Path) -> list[tuple[Question, Annotation]]:
    """Visual Genome's question-answer pairs in file order, each with its one answer."""
    data = load_json(path, VG_LAYOUT)
    if not isinstance(data, list):
        raise LayoutError(f"{path} is not a list; expected {VG_LAYOUT}")
    with _fields(path, VG_LAYOUT):
        return [(Question(int(qa["qa_id"]), int(qa["image_id"]), _text(qa["question"])),
                 Annotation((str(qa["answer"]),), str(qa["answer"]), None, None))
                for entry in data for qa in entry["qas"]]


def build_vocabulary(annotations: Sequence[Annotation], min_count: int = MIN_ANSWER_COUNT) -> list[str]:
    """The normalised ``multiple_choice_answer`` of the annotations given at least ``min_count`` times, most
    frequent first, then alphabetically (an answer that normalises to nothing is left out)."""
    counts = Counter(normalise_answer(annotation.answer) for annotation in annotations)
    counts.pop("", None)
    vocabulary = sorted((a for a, count in counts.items() if count >= min_count), key=lambda a: (-counts[a], a))
    if not vocabulary:
        raise ValueError(f"no answer is given {min_count} times or more; lower --min-answer-count")
    return vocabulary


def read_answers(path: Path) -> list[str]:
    """An answer vocabulary, one answer a line in index order; an empty line or a repeated answer is refused."""
    answers: dict[str, int] = {}
    for number, line in enumerate(require(path, "one answer a line").read_text(encoding="utf-8").splitlines(), 1):
        answer = line.strip()
        if not answer:
            raise LayoutError(f"{path}:{number}: empty line; expected one answer a line")
        if answer in answers:
            raise LayoutError(f"{path}:{number}: {answer[:80]!r} repeats line {answers[answer]}")
        answers[answer] = number
    if not answers:
        raise LayoutError(f"{path} holds no answer; expected one answer a line")
    return list(answers)


def write_answers(path: Path, answers: Sequence[str]) -> Path:
    """Write an answer vocabulary as :func:`read_answers` reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{answer}\n" for answer in answers), encoding="utf-8")
    return path


def finder(folders: Sequence[Path]) -> Callable[[str], str]:
    """Where a file name is: in the first of ``folders`` that holds it (each folder listed once, then lookups are
    free), else in the first folder that exists (where reading it then finds it missing)."""
    listings = [(folder, set(os.listdir(folder))) for folder in folders if folder.is_dir()]
    fallback = listings[0][0] if listings else folders[0]

    def find(name: str) -> str:
        return next((str(folder / name) for folder, names in listings if name in names), str(fallback / name))
    return find


def question_item(question: Question, annotation: Annotation | None, path: str, prefix: str = "q") -> Item:
    """A question's item, keyed ``<prefix><id>``: its meta holds the question and its human answers (none without
    annotation)."""
    if annotation is None:
        return Item(f"{prefix}{question.id}", path)
    return Item(f"{prefix}{question.id}", path, meta={
        "id": question.id, "image_id": question.image_id, "question": question.text,
        "answers": list(annotation.answers), "answer_type": annotation.answer_type,
        "question_type": annotation.question_type})


def soft_targets(answers: Sequence[str], index: dict[str, int]) -> list[list[float]]:
    """``[answer index, soft score]`` of each vocabulary answer among the human ``answers``, by index: the official
    score (:func:`answer_scores`); answers scored 0 are left out."""
    return sorted([index[answer], score] for answer, score in answer_scores(answers).items()
                  if answer in index and score > 0)


def _annotated(item: Item) -> dict[str, Any]:
    """The item's meta; an item without one is a question the annotations lack."""
    if item.meta is None:
        raise Skip("missing annotation", f"{item.key}: not in the annotations file")
    return item.meta


def _sample(item: Item, meta: dict[str, Any]) -> Sample:
    data, ext = read_image(item.path)
    return Sample(item.key, image=data, image_ext=ext, text=meta["question"], meta=meta)


def question_sample(index: dict[str, int], item: Item) -> Sample:
    """A VQA question's sample: the image bytes, the question as ``txt``, the meta with its ``targets``
    (:func:`soft_targets` over the vocabulary ``index``; scored here, in the writing processes) as ``json``."""
    meta = _annotated(item)
    return _sample(item, {**meta, "targets": soft_targets(meta["answers"], index)})


def visual_genome_sample(index: dict[str, int], item: Item) -> Sample:
    """A Visual Genome QA's sample, as :func:`question_sample` with its one answer, normalised, as target (score 1);
    one whose answer is not in the vocabulary is skipped (the split only serves training)."""
    meta = _annotated(item)
    answer = normalise_answer(meta["answers"][0])
    if answer not in index:
        raise Skip("answer not in vocabulary", f"{item.key}: {answer[:80]!r}")
    return _sample(item, {**meta, "targets": [[index[answer], 1.0]]})
