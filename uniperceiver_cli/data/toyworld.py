"""ToyWorld: a deterministic, procedurally drawn multimodal world for testing Uni-Perceiver at laptop scale.

Images hold one or two coloured shapes on a noisy background, videos one shape that moves, grows, shrinks
or rotates, and a text corpus describes the same world. Training tasks (shape classification, image
captioning, image-text retrieval, MLM, motion classification) leave tasks that are never trained on
(colour classification, video captioning, video-text retrieval), so zero-shot transfer can be measured::

    OUT/images/{train,val,test}/   PNG images: label = shape of the main object, 2-5 captions
    OUT/videos/{train,val,test}/   MP4 clips: label = motion, 2-4 captions
    OUT/text/{train,val}/          passages of 2-6 sentences for masked language modelling
    OUT/sentences/{train,val}/     cloze prompts for text classification (does a relation's converse follow?)
    OUT/questions/{train,val}/     PNG images with a question each and its one-word answer, for VQA
    OUT/toyworld.json              settings, label sets, training and zero-shot tasks

Every sample is drawn from its own generator seeded by (seed, split, index), so the shards are
byte-identical for any worker count or order.
"""

from __future__ import annotations

import io
import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, ImageDraw

from uniperceiver_cli.data.shards import Manifest, Sample
from uniperceiver_cli.data.sources.common import Conversion
from uniperceiver_cli.task_types import task_names

DATASET = "toyworld"
SUMMARY = "toyworld.json"
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "hexagon")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230), "yellow": (245, 225, 30),
           "purple": (150, 50, 200), "orange": (250, 140, 20), "white": (250, 250, 250), "black": (15, 15, 15)}
RADIUS = {"small": 0.12, "large": 0.2}  # fraction of the image side
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "center": (0.5, 0.5)}
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "center": "in the center"}
RELATIONS = {"to the left of": (-1, 0), "to the right of": (1, 0), "above": (0, -1), "below": (0, 1)}
INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
           "below": "above"}
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "growing", "shrinking", "rotating")
MOVING = {"moving left": "moving to the left", "moving right": "moving to the right", "moving up": "moving up",
          "moving down": "moving down", "growing": "growing", "shrinking": "shrinking", "rotating": "rotating"}
ROTATING_SHAPES = ("square", "triangle", "star", "cross", "heart", "diamond")  # visibly turn at 64 pixels
SPLIT_COUNTS = {
    "tiny": {"images/train": 64, "images/val": 32, "images/test": 32, "videos/train": 24, "videos/val": 12,
             "videos/test": 12, "text/train": 64, "text/val": 16, "sentences/train": 64, "sentences/val": 32,
             "questions/train": 64, "questions/val": 32},
    # 32,000 training images: the tiny demo model overfits 8,000 (shape: 94% train, 82% test accuracy).
    "default": {"images/train": 32000, "images/val": 500, "images/test": 1000, "videos/train": 2000,
                "videos/val": 250, "videos/test": 500, "text/train": 10000, "text/val": 500,
                "sentences/train": 4000, "sentences/val": 500, "questions/train": 4000, "questions/val": 500},
}
TASKS = {"images": task_names("image", "classification", "caption", "retrieval"), "videos": task_names("video"),
         "text": task_names("text", "mlm"), "sentences": task_names("text", "text_classification"),
         "questions": task_names("image", "vqa")}
ANSWERS = ["no", "yes"]  # the label words of the sentence classification, one token each
# The answer set of the questions: one word each, as the official evaluation normalises them (numbers as digits).
VQA_ANSWERS = [*COLOURS, *SHAPES, "1", "2", *POSITIONS, "no", "yes"]
TRAINING_TASKS = [
    {"name": "shape_classification", "task": "image_classification", "data": "images", "label_set": "shape"},
    {"name": "image_captioning", "task": "image_caption", "data": "images", "label_set": None},
    {"name": "image_text_retrieval", "task": "image_retrieval", "data": "images", "label_set": None},
    {"name": "mlm", "task": "text_mlm", "data": "text", "label_set": None},
    {"name": "motion_classification", "task": "video_classification", "data": "videos", "label_set": "motion"},
]
ZERO_SHOT_TASKS = [
    {"name": "colour_classification", "task": "image_classification", "data": "images", "label_set": "colour"},
    {"name": "video_captioning", "task": "video_caption", "data": "videos", "label_set": None},
    {"name": "video_text_retrieval", "task": "video_retrieval", "data": "videos", "label_set": None},
    {"name": "vqa", "task": "vqa", "data": "questions", "label_set": None},
]
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth edges
FPS = 8


def _normalised(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Centre a polygon's bounding box on the origin and scale its larger half-extent to 1."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    half = max(max(xs) - min(xs), max(ys) - min(ys)) / 2
    return tuple(((x - cx) / half, (y - cy) / half) for x, y in points)


def _regular(corners: int, start: float = -90.0, radii: tuple[float, ...] = (1.0,)) -> list[tuple[float, float]]:
    """A regular polygon (a star with two radii), the first corner at ``start`` degrees (y points down)."""
    count = corners * len(radii)
    angles = [math.radians(start + 360 * i / count) for i in range(count)]
    return [(radii[i % len(radii)] * math.cos(a), radii[i % len(radii)] * math.sin(a)) for i, a in enumerate(angles)]


def _heart() -> list[tuple[float, float]]:
    """The classic parametric heart curve, 40 points, point at the bottom."""
    ts = [2 * math.pi * i / 40 for i in range(40)]
    return [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
            for t in ts]


_ARM = 0.33
OUTLINES = {name: _normalised(points) for name, points in {
    "circle": _regular(32),
    "square": _regular(4, start=45),
    "triangle": _regular(3),
    "star": _regular(5, radii=(1.0, 0.42)),
    "cross": [(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1), (-_ARM, 1),
              (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)],
    "heart": _heart(),
    "diamond": [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)],
    "hexagon": _regular(6, start=0),
}.items()}


@dataclass(frozen=True)
class Thing:
    """One drawn object; centre and radius are fractions of the image side, the angle is in degrees."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    radius: float
    angle: float = 0.0

    @property
    def full(self) -> str:
        """"small red circle"."""
        return f"{self.size} {self.colour} {self.shape}"

    @property
    def plain(self) -> str:
        """"red circle"."""
        return f"{self.colour} {self.shape}"


def _a(phrase: str) -> str:
    """The phrase with its indefinite article ("an orange star")."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """The generator of one sample, independent of every other sample."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode()), index])


def _pick(rng: np.random.Generator, options: Any) -> Any:
    """One of ``options`` (a sequence, or a dict's keys), uniformly."""
    options = list(options)
    return options[int(rng.integers(len(options)))]


# --- drawing -----------------------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """A grey, slightly tinted background with blotches and pixel noise, far from every object colour."""
    base = int(rng.integers(100, 157)) + rng.integers(-10, 11, size=3)
    coarse = np.clip(base + rng.normal(0, 10, size=(4, 4, 3)), 0, 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((side, side), Image.Resampling.BILINEAR), np.int16)
    return np.clip(smooth + rng.integers(-6, 7, size=(side, side, 3)), 0, 255).astype(np.uint8)


def _polygon(thing: Thing, side: int) -> list[tuple[float, float]]:
    cos, sin = math.cos(math.radians(thing.angle)), math.sin(math.radians(thing.angle))
    scale = thing.radius * side
    return [(thing.x * side + scale * (x * cos - y * sin), thing.y * side + scale * (x * sin + y * cos))
            for x, y in OUTLINES[thing.shape]]


def _draw(background: np.ndarray, things: list[Thing]) -> np.ndarray:
    """Blend the things onto the background in integer arithmetic (exact, platform-independent)."""
    side = background.shape[0]
    image = background.astype(np.int32)
    for thing in things:
        mask = Image.new("L", (side * SUPERSAMPLE, side * SUPERSAMPLE))
        ImageDraw.Draw(mask).polygon(_polygon(thing, side * SUPERSAMPLE), fill=255)
        alpha = np.asarray(mask.resize((side, side), Image.Resampling.BOX), np.int32)[..., None]
        image = (image * (255 - alpha) + np.array(COLOURS[thing.colour], np.int32) * alpha + 127) // 255
    return image.astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def _mp4(frames: list[np.ndarray]) -> bytes:
    """H.264 in MP4, single-threaded with fixed options so that the bytes are reproducible."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "20", "threads": "1"}
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return out.getvalue()


# --- images ------------------------------------------------------------------------------------------------------

SINGLE_TEMPLATES = ("{a_full} {where}", "there is {a_full} {where}", "{where} there is {a_full}", "{a_plain} {where}",
                    "a picture of {a_full}", "the {full} is {where}", "a {size} {shape} coloured {colour}")
PAIR_TEMPLATES = ("{a_full} {relation} {a_other}", "{a_other} {inverse} {a_full}",
                  "there is {a_full} {relation} {a_other}", "the {full} is {relation} the {other}",
                  "two shapes: {a_full} and {a_other}", "{a_plain} and {a_other_plain}")


def _image_scene(rng: np.random.Generator, shape: str) -> tuple[list[Thing], str, str | None]:
    """The things (main one first), the main thing's position and the relation to the other (if two).

    In a two-object scene the main thing is large and the other small and of another shape, so "the shape
    of the largest object" (the label) is well defined.
    """
    colour, angle = _pick(rng, COLOURS), float(rng.uniform(-15, 15))
    if rng.random() < 0.7:
        size, position = _pick(rng, RADIUS), _pick(rng, POSITIONS)
        x, y = (c + float(rng.uniform(-0.04, 0.04)) for c in POSITIONS[position])
        return [Thing(shape, colour, size, x, y, RADIUS[size] * float(rng.uniform(0.9, 1.1)), angle)], position, None
    relation = _pick(rng, RELATIONS)
    dx, dy = RELATIONS[relation]
    position = {(-1, 0): "left", (1, 0): "right", (0, -1): "top", (0, 1): "bottom"}[(dx, dy)]
    spots = [(0.5 + s * dx * 0.21 + dy * float(rng.uniform(-0.12, 0.12)),
              0.5 + s * dy * 0.21 + dx * float(rng.uniform(-0.12, 0.12))) for s in (1, -1)]
    other = Thing(_pick(rng, [s for s in SHAPES if s != shape]), _pick(rng, COLOURS), "small", *spots[1],
                  RADIUS["small"] * float(rng.uniform(0.9, 1.1)), float(rng.uniform(-15, 15)))
    main = Thing(shape, colour, "large", *spots[0], RADIUS["large"] * float(rng.uniform(0.9, 1.1)), angle)
    return [main, other], position, relation


def _image_templates(things: list[Thing], position: str, relation: str | None) -> tuple[tuple[str, ...], dict]:
    """The caption templates of a scene and the fields that fill them."""
    main = things[0]
    fields = {"full": main.full, "a_full": _a(main.full), "a_plain": _a(main.plain), "size": main.size,
              "shape": main.shape, "colour": main.colour, "where": WHERE[position]}
    if relation is None:
        return SINGLE_TEMPLATES, fields
    other = things[1]
    fields |= {"other": other.full, "a_other": _a(other.full), "a_other_plain": _a(other.plain),
               "relation": relation, "inverse": INVERSE[relation]}
    return PAIR_TEMPLATES, fields


def _captions(rng: np.random.Generator, templates: tuple[str, ...], fields: dict[str, str], most: int) -> list[str]:
    """2 to ``most`` captions from distinct templates, in random order."""
    count = int(rng.integers(2, most + 1))
    return [templates[i].format(**fields) for i in rng.permutation(len(templates))[:count]]


def _image_captions(rng: np.random.Generator, things: list[Thing], position: str, relation: str | None) -> list[str]:
    """2-5 captions; every one names the main thing's shape and colour."""
    return _captions(rng, *_image_templates(things, position, relation), most=5)


def image_sample(index: int, *, split: str, seed: int, image_size: int) -> Sample:
    """Image ``index`` of ``split``: PNG, label = main shape (cycling, so splits are balanced), captions."""
    rng = _rng(seed, f"images/{split}", index)
    shape = SHAPES[index % len(SHAPES)]
    things, position, relation = _image_scene(rng, shape)
    image = _draw(_background(rng, image_size), things)
    captions = _image_captions(rng, things, position, relation)
    main, key = things[0], f"{DATASET}-img-{split}-{index:06d}"
    meta = {"id": key, "captions": captions, "shape": main.shape, "colour": main.colour, "size": main.size,
            "position": position, "relation": relation,
            "labels": {"shape": SHAPES.index(main.shape), "colour": list(COLOURS).index(main.colour)},
            "objects": [{"shape": t.shape, "colour": t.colour, "size": t.size} for t in things]}
    return Sample(key, image=_png(image), image_ext="png", text=captions[0], label=meta["labels"]["shape"],
                  meta=meta)


# --- videos ------------------------------------------------------------------------------------------------------

VIDEO_TEMPLATES = ("{a_plain} {moving}", "{a_full} {moving}", "the {plain} is {moving}",
                   "a video of {a_plain} {moving}", "{a_full} that is {moving}")


def _trajectory(rng: np.random.Generator, motion: str, start: Thing, num_frames: int) -> list[Thing]:
    """The thing in every frame: moved across, scaled or turned linearly from the first to the last frame."""
    begin, end = 0.25 + float(rng.uniform(-0.03, 0.03)), 0.75 + float(rng.uniform(-0.03, 0.03))
    turn = float(rng.choice([-1, 1]) * rng.uniform(100, 160))

    def at(t: float) -> dict[str, float]:
        along = begin + (end - begin) * t
        return {"moving left": {"x": 1 - along}, "moving right": {"x": along}, "moving up": {"y": 1 - along},
                "moving down": {"y": along}, "growing": {"radius": 0.07 + 0.15 * t},
                "shrinking": {"radius": 0.07 + 0.15 * (1 - t)}, "rotating": {"angle": start.angle + turn * t}}[motion]

    return [replace(start, **at(f / (num_frames - 1))) for f in range(num_frames)]


def _video_fields(thing: Thing, motion: str) -> dict[str, str]:
    return {"a_plain": _a(thing.plain), "a_full": _a(thing.full), "plain": thing.plain, "moving": MOVING[motion]}


def video_sample(index: int, *, split: str, seed: int, image_size: int, num_frames: int) -> Sample:
    """Video ``index`` of ``split``: MP4 of one moving thing, label = motion (cycling), captions."""
    rng = _rng(seed, f"videos/{split}", index)
    motion = MOTIONS[index % len(MOTIONS)]
    shape = _pick(rng, ROTATING_SHAPES if motion == "rotating" else SHAPES)
    size = {"growing": "small", "shrinking": "large"}.get(motion) or _pick(rng, RADIUS)
    start = Thing(shape, _pick(rng, COLOURS), size, 0.5 + float(rng.uniform(-0.08, 0.08)),
                  0.5 + float(rng.uniform(-0.08, 0.08)), RADIUS[size] * float(rng.uniform(0.9, 1.0)),
                  float(rng.uniform(-15, 15)))
    background = _background(rng, image_size)
    video = _mp4([_draw(background, [thing]) for thing in _trajectory(rng, motion, start, num_frames)])
    captions = _captions(rng, VIDEO_TEMPLATES, _video_fields(start, motion), most=4)
    key = f"{DATASET}-vid-{split}-{index:06d}"
    meta = {"id": key, "captions": captions, "motion": motion, "shape": shape, "colour": start.colour,
            "size": size, "labels": {"motion": MOTIONS.index(motion)}}
    return Sample(key, video=video, video_ext="mp4", text=captions[0], label=meta["labels"]["motion"], meta=meta)


# --- text --------------------------------------------------------------------------------------------------------

NUMBERS = ("one", "two", "three", "four", "five")
SHAPE_FACTS = {
    "circle": "a circle is round and has no corners", "square": "a square has four equal sides",
    "triangle": "a triangle has three corners", "star": "a star has five points", "cross": "a cross has four arms",
    "heart": "a heart is round at the top and pointed at the bottom",
    "diamond": "a diamond has four corners and is taller than it is wide", "hexagon": "a hexagon has six corners",
}
MOTION_FACTS = {
    "moving left": "a {plain} moving to the left ends up on the left",
    "moving right": "a {plain} moving to the right ends up on the right",
    "moving up": "a {plain} moving up ends up at the top",
    "moving down": "a {plain} moving down ends up at the bottom",
    "growing": "a growing {shape} gets bigger", "shrinking": "a shrinking {shape} gets smaller",
    "rotating": "a rotating {shape} turns around its center",
}


def _random_thing(rng: np.random.Generator) -> Thing:
    return Thing(_pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, RADIUS), 0.5, 0.5, 0.1)


def _scene_sentence(rng: np.random.Generator) -> str:
    return _image_captions(rng, *_image_scene(rng, _pick(rng, SHAPES)))[0]


def _relation_sentence(rng: np.random.Generator) -> str:
    a, b, relation = _random_thing(rng), _random_thing(rng), _pick(rng, RELATIONS)
    return f"if {_a(a.full)} is {relation} {_a(b.full)}, then the {b.full} is {INVERSE[relation]} the {a.full}"


def _motion_sentence(rng: np.random.Generator) -> str:
    thing, motion = _random_thing(rng), _pick(rng, MOTIONS)
    if rng.random() < 0.5:
        return MOTION_FACTS[motion].format(plain=thing.plain, shape=thing.shape)
    return f"the {thing.plain} is {MOVING[motion]}"


def _count_sentence(rng: np.random.Generator) -> str:
    thing, count = _random_thing(rng), int(rng.integers(len(NUMBERS)))
    if count == 0:
        return f"there is one {thing.plain}"
    shapes = thing.shape + ("es" if thing.shape.endswith("s") else "s")  # "crosses"
    return f"there are {NUMBERS[count]} {thing.colour} {shapes}"


def _fact_sentence(rng: np.random.Generator) -> str:
    return SHAPE_FACTS[_pick(rng, SHAPES)]


SENTENCES: tuple[Callable[[np.random.Generator], str], ...] = (
    _scene_sentence, _relation_sentence, _motion_sentence, _count_sentence, _fact_sentence)


def text_sample(index: int, *, split: str, seed: int) -> Sample:
    """Passage ``index`` of ``split``: 2-6 sentences about ToyWorld."""
    rng = _rng(seed, f"text/{split}", index)
    sentences = [_pick(rng, SENTENCES)(rng) for _ in range(int(rng.integers(2, 7)))]
    key = f"{DATASET}-txt-{split}-{index:06d}"
    return Sample(key, text=" ".join(s[0].upper() + s[1:] + "." for s in sentences))


def sentence_sample(index: int, *, split: str, seed: int) -> Sample:
    """Cloze ``index`` of ``split``, for text classification: does a relation's claimed converse follow (label 1,
    "yes") or not ("no", another relation claimed)? Half follow. The <|spe|> slot ends the prompt."""
    rng = _rng(seed, f"sentences/{split}", index)
    a, b, relation = _random_thing(rng), _random_thing(rng), _pick(rng, RELATIONS)
    follows = bool(rng.random() < 0.5)
    claimed = INVERSE[relation] if follows else _pick(rng, [r for r in RELATIONS if r != INVERSE[relation]])
    text = f"If {_a(a.full)} is {relation} {_a(b.full)}, is the {b.full} {claimed} the {a.full}? <|spe|>"
    return Sample(f"{DATASET}-sen-{split}-{index:06d}", text=text, label=int(follows))


# --- questions ---------------------------------------------------------------------------------------------------

QUESTION_TYPES = ("colour", "shape", "count", "position", "exists")


def _question(rng: np.random.Generator, kind: str, things: list[Thing], position: str) -> tuple[str, str]:
    """A question of ``kind`` about a scene (main thing first) and its answer."""
    main = things[0]
    if kind == "colour":
        return f"what colour is the {main.shape}?", main.colour
    if kind == "shape":
        return f"what shape is the {main.colour} {main.size} object?", main.shape
    if kind == "count":
        return _pick(rng, ("how many shapes are there?", "how many objects are in the picture?")), str(len(things))
    if kind == "position":
        return f"where is the {main.plain}?", position
    asked = main if rng.random() < 0.5 else _random_thing(rng)
    there = any((t.shape, t.colour) == (asked.shape, asked.colour) for t in things)
    return f"is there {_a(asked.plain)}?", "yes" if there else "no"


def question_sample(index: int, *, split: str, seed: int, image_size: int) -> Sample:
    """Question ``index`` of ``split``: a drawn scene (as the images) and a question of each type in turn (colour,
    shape, count, position, whether a thing is there) with its answer, which all 10 "humans" give."""
    rng = _rng(seed, f"questions/{split}", index)
    things, position, _ = _image_scene(rng, _pick(rng, SHAPES))
    image = _draw(_background(rng, image_size), things)
    kind = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    question, answer = _question(rng, kind, things, position)
    key = f"{DATASET}-qa-{split}-{index:06d}"
    meta = {"id": key, "question": question, "answers": [answer] * 10, "answer_type": kind,
            "targets": [[VQA_ANSWERS.index(answer), 1.0]],
            "objects": [{"shape": t.shape, "colour": t.colour, "size": t.size} for t in things]}
    return Sample(key, image=_png(image), image_ext="png", text=question, meta=meta)


# --- what is true of a sample ------------------------------------------------------------------------------------


def true_captions(meta: dict[str, Any]) -> set[str]:
    """Every caption ToyWorld could write for the scene of a sample's ``meta`` (its .json member): a caption is
    true of an image or clip when it is in this set, as of a look-alike sample (same objects, colours, sizes,
    position, relation or motion), even where it is another sample's caption. Image-text retrieval counts such a
    top caption as a hit beside the strict R@1, which asks for the image's own caption."""
    if "motion" in meta:
        thing = Thing(meta["shape"], meta["colour"], meta["size"], 0.5, 0.5, 0.1)
        return {t.format(**_video_fields(thing, meta["motion"])) for t in VIDEO_TEMPLATES}
    things = [Thing(o["shape"], o["colour"], o["size"], 0.5, 0.5, 0.1) for o in meta["objects"]]
    templates, fields = _image_templates(things, meta["position"], meta["relation"])
    return {t.format(**fields) for t in templates}


def true_caption_recall(best: dict[str, str], metas: dict[str, dict[str, Any]]) -> float:
    """Retrieval R@1 in percent where a hit is a top caption true of the item (``best``: key -> top caption, as in a
    retrieval's predictions.jsonl; ``metas``: key -> meta, ``shards.read_metas``)."""
    if not best:
        raise ValueError("no retrieval predictions to score")
    return 100.0 * sum(best[key] in true_captions(metas[key]) for key in best) / len(best)


def strict_recall_ceiling(metas: dict[str, dict[str, Any]], captions_per_item: int | None = 1) -> float:
    """The strict R@1 in percent of a model that ranks every caption true of an item above the others, in random
    order among them, against each item's first ``captions_per_item`` captions (None: all of them). A caption
    that is word for word another item's too always ties with a wrong candidate, and a tie counts against the
    query (``metrics.retrieval_recall``). A model that prefers each item's own wording can beat it; no model beats the
    share of items with a caption no other item has."""
    if not metas:
        raise ValueError("no items to rank captions for")
    owners: dict[str, set[str]] = {}
    for key, meta in metas.items():
        for caption in meta["captions"][:captions_per_item]:
            owners.setdefault(caption, set()).add(key)
    total = 0.0
    for key, meta in metas.items():
        true = true_captions(meta) & owners.keys()
        own = sum(owners[c] == {key} for c in dict.fromkeys(meta["captions"][:captions_per_item]))
        total += own / len(true)  # one of the item's own (untied) captions comes first
    return 100.0 * total / len(metas)


# --- the data set ------------------------------------------------------------------------------------------------


def _conversion(name: str, count: int, *, seed: int, image_size: int, num_frames: int) -> Conversion:
    kind, split = name.split("/")
    source = f"toyworld(seed={seed})"
    if kind == "images":
        make = partial(image_sample, split=split, seed=seed, image_size=image_size)
        manifest = Manifest(f"{DATASET}-images", split, "image", TASKS[kind], source, classes=list(SHAPES),
                            extra={"label_sets": {"shape": list(SHAPES), "colour": list(COLOURS)},
                                   "image_size": image_size})
    elif kind == "videos":
        make = partial(video_sample, split=split, seed=seed, image_size=image_size, num_frames=num_frames)
        manifest = Manifest(f"{DATASET}-videos", split, "video", TASKS[kind], source, classes=list(MOTIONS),
                            extra={"label_sets": {"motion": list(MOTIONS)}, "image_size": image_size,
                                   "num_frames": num_frames})
    elif kind == "questions":
        make = partial(question_sample, split=split, seed=seed, image_size=image_size)
        manifest = Manifest(f"{DATASET}-questions", split, "image", TASKS[kind], source, classes=VQA_ANSWERS,
                            extra={"image_size": image_size, "question_types": list(QUESTION_TYPES)})
    elif kind == "sentences":
        make = partial(sentence_sample, split=split, seed=seed)
        manifest = Manifest(f"{DATASET}-sentences", split, "text", TASKS[kind], source, classes=ANSWERS)
    else:
        make = partial(text_sample, split=split, seed=seed)
        manifest = Manifest(f"{DATASET}-text", split, "text", TASKS[kind], source)
    return Conversion(manifest, range(count), make)


def _extended_by(found: Any, summary: dict[str, Any]) -> bool:
    """Whether a folder's summary is ``summary``'s, or that of version 2 or 3 with the same settings, whose splits
    are all drawn alike by version 4 (version 3 added the sentence splits, 4 the question splits): its splits are
    kept and the new ones drawn."""
    if found == summary:
        return True
    if not isinstance(found, dict) or found.get("version") not in (2, 3) or not isinstance(found.get("splits"), dict):
        return False
    drawn = ("version", "splits", "zero_shot_tasks")  # what the new versions add to; the rest sets the draws
    same = {k: v for k, v in found.items() if k not in drawn} == {k: v for k, v in summary.items() if k not in drawn}
    return same and found["splits"].items() <= summary["splits"].items()


def generate(out: str | Path, *, size: str = "default", seed: int = 0, image_size: int = 64, num_frames: int = 8,
             min_shards: int = 4, workers: int = 1, progress: bool = True) -> dict[str, Manifest]:
    """Draw ToyWorld into ``out`` (resumable: finished shards are kept) and return the split manifests.

    Args:
        out: the folder to fill; it may only hold a ToyWorld drawn with the same settings.
        size: "tiny" (a few hundred samples, for tests) or "default" (see ``SPLIT_COUNTS``).
        seed: the world's seed (non-negative); the same seed gives byte-identical shards.
        image_size: side of the square images and video frames in pixels (even, at least 16).
        num_frames: frames per video (at least 2).
        min_shards: at least this many shards per split.
        workers: processes drawing shards in parallel; the output does not depend on it.
        progress: show progress bars.

    Returns:
        The manifests keyed "images/train", "images/val", "images/test", "videos/...", "text/train", "text/val",
        "sentences/train", "sentences/val", "questions/train", "questions/val".

    Raises:
        ValueError: on an unknown size or bad settings, or when ``out`` holds a ToyWorld drawn differently.
    """
    if size not in SPLIT_COUNTS:
        raise ValueError(f"size must be one of {sorted(SPLIT_COUNTS)}, got {size!r}")
    if seed < 0 or image_size < 16 or image_size % 2 or num_frames < 2:
        raise ValueError("need seed >= 0, an even image_size >= 16 and num_frames >= 2")
    out = Path(out)
    summary = {"dataset": DATASET, "version": 4, "seed": seed, "size": size, "image_size": image_size,
               "num_frames": num_frames, "splits": SPLIT_COUNTS[size],
               "label_sets": {"shape": list(SHAPES), "colour": list(COLOURS), "motion": list(MOTIONS)},
               "training_tasks": TRAINING_TASKS, "zero_shot_tasks": ZERO_SHOT_TASKS}
    path = out / SUMMARY
    if path.exists() and not _extended_by(json.loads(path.read_text()), summary):
        raise ValueError(f"{out} holds a ToyWorld drawn with other settings or by an older version; "
                         "delete it or use an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")  # first, so a resumed run checks its settings
    return {name: _conversion(name, count, seed=seed, image_size=image_size, num_frames=num_frames)
            .write(out / name, min_shards=min_shards, workers=workers, progress=progress)
            for name, count in SPLIT_COUNTS[size].items()}
