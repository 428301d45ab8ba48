"""Task batches streamed from WebDataset shards.

``make_loader(source, task=..., ...)`` reads a shard folder (``manifest.json`` + ``shard-*.tar``) or a list
of shard URLs and yields collated batch dicts. What runs where:

- **Opening**: a folder's shards are local files, opened with ``open`` (a folder named ``pipe:...`` is still a
  folder). URLs and pipes (``http://``, ``pipe:``, any ``scheme:``, :func:`is_remote`) are opened only with
  ``UNIPERCEIVER_STREAMING=1`` (:data:`STREAMING_ENV`): http(s) with urllib under a timeout, the others with
  webdataset's ``gopen`` (``pipe:`` runs its command in the shell).

- **Shards** are split across processes x data-loader workers ("readers", reader ``rank * num_workers +
  worker``): epoch ``e``'s shard order (shuffled with ``(seed, e)`` in training, the listed order in
  evaluation; the same on every process) is dealt out as ``order[reader::readers]``, so one epoch reads every
  sample exactly once. A data set with fewer shards than readers is split by sample instead: every reader
  reads every shard and keeps every ``readers``-th sample.
- **Samples** are read with a tar reader that reads past damaged member headers (:func:`_tar_members`) and
  grouped by key as webdataset does, filtered by the optional 1% subset, shuffled in a ``shuffle_buffer``
  (training, webdataset's algorithm), decoded and transformed, then batched inside the worker with one
  collate call per batch: tensors are stacked and texts tokenised with one ``encode_batch``.
- **Bad data is skipped and counted**, never fatal (the rules: docs/data.md, "Reading shards"; the tar damage:
  :func:`read_shards`). Each worker attaches the counts since its last batch to the next batch, and one last
  count-only item when it finishes; the main process strips them and adds them to :attr:`ShardLoader.skipped`.

Randomness: the shard order, the sample shuffle and the caption choice and video clip sampling come from
three generators seeded with ``(seed, epoch, rank, worker)``; the image augmentations (timm, torchvision) use
each worker's global RNGs, which the DataLoader seeds from ``seed`` too. With ``num_workers=0`` they use the
calling process's global RNGs. Random erasing's noise is drawn on the device by :func:`visual_input`.

- **Resuming**: each batch carries its position in its worker's stream (:data:`POSITION`);
  :meth:`ShardLoader.state` keeps the last one handed out per worker, and a loader given it back
  (:meth:`ShardLoader.restore`) goes on with the same samples, draws and batches as the stream it continues:
  whole epochs are skipped by the shards' sample counts (their stats files' listings), and within the epoch it
  resumes in, the samples before are passed over reading tar headers only (local shards are seeked through;
  nothing is decoded); the few samples its shuffle buffer then holds are read again. The shuffle runs per
  epoch, with its own draws, so every epoch can be started by itself.
"""

from __future__ import annotations

import bz2
import contextlib
import functools
import io
import json
import lzma
import os
import random
import re
import tarfile
import urllib.request
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any, BinaryIO, TypedDict
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.overrides import handle_torch_function, has_torch_function_unary
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.worker import _generate_state  # the numpy seed the DataLoader gives a worker
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from uniperceiver_cli.data.shards import (
    IMAGE_EXTS,
    STREAM_TIMEOUT,
    VIDEO_EXTS,
    Manifest,
    Skip,
    is_remote,
    is_split_url,
    require_streaming,
    shard_path,
    shard_urls,
)
from uniperceiver_cli.data.shards import stream_timeout as shards_stream_timeout
from uniperceiver_cli.data.transforms import build_image_transform, erasing_box
from uniperceiver_cli.data.video import STRIDE, eval_clip, train_clip
from uniperceiver_cli.model.config import IMAGENET_MEAN, IMAGENET_STD, SPE_ID, VIDEO_MEAN, VIDEO_STD
from uniperceiver_cli.model.preprocess import VIDEO_NUM_CROPS
from uniperceiver_cli.model.tokenizer import cloze_ids, get_tokenizer, pad_rows
from uniperceiver_cli.random_state import global_rng_state, python_state, set_global_rng_state
from uniperceiver_cli.task_types import TASKS, TaskType
from uniperceiver_cli.text_files import read_json

SKIPPED = "__skipped__"  # per-batch skip counts travelling from the workers to the main process
POSITION = "__position__"  # where a batch leaves its worker's stream (ShardStream.position), for resuming
CAPTIONS = "__captions__"  # a raw sample's caption indices in a caption-pair subset
Subset = dict[tuple[str, str], tuple[int, ...] | None]  # (shard file name, key) -> its chosen captions (None: all)
UNREADABLE_SHARD = "unreadable shard"
UNREADABLE_MEMBER = "unreadable member"


class Batch(TypedDict, total=False):
    """A collated batch: ``keys`` and, by task type, the fields below (B samples)."""

    keys: list[str]
    images: torch.Tensor  # image tasks: (B, 3, S, S) uint8, normalised by visual_input
    erase: torch.Tensor  # classification training: (B, 4) long, each image's erasing box (top, left, height, width)
    videos: torch.Tensor  # video tasks, uint8: (B, T, 3, S, S) in training, (B * num_views, T, 3, S, S) in evaluation
    num_views: int  # evaluation videos: V = clips x crops, row sample * V + clip * crops + crop
    labels: torch.Tensor  # classification, text classification, VQA training (a drawn answer): (B,) long
    text_ids: torch.Tensor  # (B, L) long: one caption per sample (caption, retrieval), the passage (mlm) or prompt
    slots: torch.Tensor  # text classification, VQA: (B,) long, the position of each prompt's <|spe|> in text_ids
    answer_scores: torch.Tensor  # VQA training: (B, A) float, each answer's score (0 for most)
    answers: list[list[str]]  # VQA evaluation: the human answers of each question
    answer_types: list[str]  # VQA evaluation: each question's answer type ("" where the data names none)
    text_padding: torch.Tensor  # (B, L) bool, True at padding
    captions: list[list[str]]  # caption and retrieval: every caption of each sample


def visual_input(batch: Batch, device: torch.device) -> torch.Tensor:
    """A batch's images or videos on ``device``, normalised. Pixels that travel as uint8 are normalised here by
    the same float32 operations as torchvision's ToTensor and Normalize (ImageNet's mean and std for images, 0.5
    for videos), so to the same values; a batch's erasing boxes (classification training) are then filled with
    standard normal noise drawn here, as timm's ``RandomErasing`` fills them in the normalised space. A hand-made
    float batch is taken as normalised."""
    video = "videos" in batch
    pixels = to_device(batch["videos"] if video else batch["images"], device)
    if pixels.dtype != torch.uint8:
        return pixels
    mean, std = _normalisation(device, video)
    pixels = pixels.to(torch.float32).div_(255).sub_(mean).div_(std)
    if "erase" in batch:
        pixels = _erase(pixels, to_device(batch["erase"], device))
    return pixels


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device`` without making the host wait: from host memory to a GPU through pinned memory (a
    copy from pageable memory waits for the device's queue), with ``non_blocking``; already there, as it is. (It
    is a torch function, so the host-sync census, ``train/host_syncs.py``, sees it as the asynchronous copy it
    is.)"""
    if has_torch_function_unary(tensor):
        return handle_torch_function(to_device, (tensor,), tensor, device)
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@functools.cache
def _normalisation(device: torch.device, video: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std ``(3, 1, 1)`` on ``device``, made once (a tensor built from Python numbers is a copy to the
    device that the host waits for)."""
    mean, std = (VIDEO_MEAN, VIDEO_STD) if video else (IMAGENET_MEAN, IMAGENET_STD)
    return torch.tensor(mean, device=device).view(3, 1, 1), torch.tensor(std, device=device).view(3, 1, 1)


def _erase(pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``pixels`` ``(B, 3, S, S)`` with box ``(top, left, height, width)`` of each row of ``boxes`` ``(B, 4)`` filled
    with standard normal noise; a batch-wide mask, so no loop or host sync."""
    top, left, height, width = boxes.view(-1, 4, 1, 1).unbind(1)
    rows = torch.arange(pixels.shape[-2], device=pixels.device).view(1, -1, 1)
    cols = torch.arange(pixels.shape[-1], device=pixels.device).view(1, 1, -1)
    inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)  # (B, S, S)
    return torch.where(inside.unsqueeze(1), torch.randn_like(pixels), pixels)


@dataclass(frozen=True)
class Shard:
    """One tar to read, how many samples it should hold when known (from the manifest), and whether ``url`` is a
    URL or pipe (:func:`is_remote`) rather than a local file."""

    url: str
    samples: int | None = None
    remote: bool = False


def open_shard(shard: Shard, timeout: float) -> BinaryIO:
    """A local shard as a file; a remote one (streaming enabled) with urllib for http(s), else with ``gopen``.
    ``timeout``: seconds an http(s) server may take to answer or to send the next bytes."""
    if not shard.remote:
        return open(shard.url, "rb")  # noqa: SIM115 - closed by read_shards
    require_streaming(shard.url)
    if urlparse(shard.url).scheme.lower() in ("http", "https"):
        return urllib.request.urlopen(shard.url, timeout=timeout)  # noqa: S310 - the user asked for this URL
    return gopen(shard.url)


# ---------------------------------------------------------------------------------------------------- samples


def sample_json(raw: dict[str, Any]) -> dict[str, Any]:
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except (ValueError, RecursionError) as error:  # ValueError: also UnicodeDecodeError
        raise Skip("bad json", str(error)[:200]) from error
    if not isinstance(meta, dict):
        raise Skip("bad json", f"a sample's json is an object, not {type(meta).__name__}")
    return meta


def sample_text(raw: dict[str, Any]) -> str:
    try:
        return raw["txt"].decode("utf-8") if "txt" in raw else ""
    except UnicodeDecodeError as error:
        raise Skip("bad text", str(error)[:200]) from error


def _label(raw: dict[str, Any], label_set: str | None) -> int:
    try:
        value = sample_json(raw)["labels"][label_set] if label_set else raw["cls"]
        return int(value)
    except KeyError as error:
        raise Skip("missing label", f"{label_set or 'cls'}: {error}") from error
    except ValueError as error:
        raise Skip("bad label", str(error)) from error


def _captions(raw: dict[str, Any]) -> list[str]:
    captions = sample_json(raw).get("captions") or [sample_text(raw)]
    if CAPTIONS in raw:  # a caption-pair subset: the captions drawn for this item
        captions = [captions[i] for i in raw[CAPTIONS] if i < len(captions)]
    captions = [" ".join(str(caption).split()) for caption in captions]
    captions = [caption for caption in captions if caption]
    if not captions:
        raise Skip("empty caption")
    return captions


def _media(raw: dict[str, Any], exts: tuple[str, ...], what: str) -> bytes:
    ext = next((ext for ext in exts if ext in raw), None)
    if ext is None:
        raise Skip(f"missing {what}")
    return raw[ext]


def _image(raw: dict[str, Any]) -> Image.Image:
    data = _media(raw, IMAGE_EXTS, "image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds for bad files
        raise Skip("undecodable image", str(error)[:200]) from error


@dataclass
class SampleDecoder:
    """Turns one raw tar sample (member name -> bytes) into the fields its task needs.

    Returns a dict with ``key`` and, by task: ``input`` (image ``(3, S, S)``, train video ``(T, 3, S, S)`` or
    eval video ``(views, T, 3, S, S)``), ``label``, ``text`` (the caption to train on, or the MLM passage) and
    ``captions`` (all of them). Raises :class:`Skip` for a sample that cannot be used.
    """

    task: TaskType
    train: bool
    image_size: int
    num_frames: int
    num_crops: int
    num_clips: int
    label_set: str | None
    augment: bool = True  # False: training samples get the deterministic evaluation transform
    stride: float = STRIDE  # video: source frames between sampled frames at 30 fps
    max_text_len: int | None = None  # text classification, VQA: prompts are cut to this many tokens, keeping the slot
    answers: Sequence[str] = ()  # VQA: the answer set (the split's classes), which the left/right flip maps

    def __post_init__(self) -> None:
        self.image_transform = (
            build_image_transform(self.task.name, self.image_size, train=self.train and self.augment)
            if self.task.modality == "image" else None
        )
        self.erasing = self.task.family == "classification" and self.train and self.augment
        self.flip = self.task.family == "vqa" and self.train and self.augment
        self.flipped = flipped_answers(self.answers) if self.flip else {}

    def __call__(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        sample: dict[str, Any] = {"key": raw["__key__"]}
        if self.task.modality == "text":
            text = " ".join(sample_text(raw).split())
            if not text:
                raise Skip("empty text")
            if self.task.family == "text_classification":
                sample["ids"] = prompt_ids(text, self.max_text_len or 256)
                sample["label"] = _label(raw, self.label_set)
            else:
                sample["text"] = text
            return sample
        if self.task.family == "vqa":
            return self._vqa(raw, rng, sample)
        if self.task.family in ("caption", "retrieval"):
            captions = _captions(raw)
            sample["captions"] = captions
            sample["text"] = rng.choice(captions) if self.train else captions[0]
        if self.task.family == "classification":
            sample["label"] = _label(raw, self.label_set)
        if self.image_transform is not None:
            sample["input"] = self.image_transform(_image(raw))
            if self.erasing:
                sample["erase"] = erasing_box(self.image_size)
        elif self.train and self.augment:
            sample["input"] = train_clip(_media(raw, VIDEO_EXTS, "video"), self.image_size, self.num_frames, rng,
                                         self.stride)
        else:
            views = eval_clip(_media(raw, VIDEO_EXTS, "video"), self.image_size, self.num_frames, self.num_crops,
                              self.num_clips, self.stride)
            sample["input"] = views[0] if self.train else views
        return sample

    def _vqa(self, raw: dict[str, Any], rng: random.Random, sample: dict[str, Any]) -> dict[str, Any]:
        """A VQA sample: the image, the question's ids with its answer slot (``ids``), the answer targets (index,
        score) and, in training, one answer drawn in proportion to its score (``label``; a question none of whose
        answers is in the answer set is skipped), in evaluation the human answers. Training flips half the images
        left to right and swaps "left" and "right" in the question and the answers (the reference's flip, whose
        swap of a sub-word id missed the question's words)."""
        meta = sample_json(raw)
        question = " ".join(_SPECIAL.sub(" ", sample_text(raw)).split())  # its own slot alone marks the answer
        if not question:
            raise Skip("empty question")
        if self.train:
            targets = _answer_targets(meta, len(self.answers))
            if not targets:  # before the image is decoded; the flip only drops answers
                raise Skip("no answer in the answer set")
        else:
            sample["answers"] = _human_answers(meta)
            sample["answer_type"] = str(meta.get("answer_type") or "")
        image = _image(raw)
        if self.flip and rng.random() < 0.5:
            flipped = [(self.flipped[i], score) for i, score in targets if self.flipped.get(i) is not None]
            if flipped:  # else none of its answers has its mirror image in the answer set: it stays as it is
                image, question = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), swap_left_right(question)
                targets = flipped
        sample["ids"] = prompt_ids(f"{question} <|spe|>", self.max_text_len or 23)
        sample["input"] = self.image_transform(image)
        if self.train:
            sample["targets"] = targets
            sample["label"] = rng.choices([i for i, _ in targets], weights=[score for _, score in targets])[0]
        return sample


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_SPECIAL = re.compile(r"<\|(startoftext|endoftext|gen|spe|mask)\|>", re.IGNORECASE)  # the tokenizer's special tokens


def swap_left_right(text: str) -> str:
    """``text`` with the words "left" and "right" swapped (what a horizontal flip does to their meaning)."""
    return _LEFT_RIGHT.sub(lambda m: "right" if m.group(0).lower() == "left" else "left", text)


def flipped_answers(answers: Sequence[str]) -> dict[int, int | None]:
    """Each answer's index -> the index of the answer it becomes under a horizontal flip (itself, without "left" or
    "right"; None when its swapped form is not an answer)."""
    index = {answer: i for i, answer in enumerate(answers)}
    return {i: index.get(swap_left_right(answer)) for i, answer in enumerate(answers)}


def _answer_targets(meta: dict[str, Any], size: int) -> list[tuple[int, float]]:
    """A VQA sample's ``targets``: (answer index, score) pairs, checked against the answer set's ``size``."""
    targets = meta.get("targets") or []
    good = isinstance(targets, list) and all(
        isinstance(pair, list) and len(pair) == 2 and type(pair[0]) is int and 0 <= pair[0] < size
        and type(pair[1]) in (int, float) and 0 < pair[1] <= 1 for pair in targets)
    if not good:
        raise Skip("bad answer targets", f"targets are [answer index, score] pairs, an index among the {size} "
                                         f"answers and a score in (0, 1]")
    return [(i, float(score)) for i, score in targets]


def _human_answers(meta: dict[str, Any]) -> list[str]:
    """A VQA sample's human ``answers``: a list of strings (none: the question is predicted, not scored)."""
    answers = meta.get("answers") or []
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise Skip("bad answers", "a sample's answers are a list of strings")
    return answers


def prompt_ids(text: str, max_len: int) -> list[int]:
    """A cloze prompt's ids, cut around its slot (:func:`~uniperceiver_cli.model.tokenizer.cloze_ids`); a prompt
    without a slot is skipped ("no <|spe|> slot")."""
    try:
        return cloze_ids(get_tokenizer().encode(text), max_len)
    except ValueError as error:
        raise Skip("no <|spe|> slot", "a text classification prompt holds <|spe|> where its answer goes") from error


@dataclass
class Collate:
    """Stacks a list of decoded samples into one :class:`Batch`."""

    task: TaskType
    train: bool
    max_text_len: int
    text_multiple: int = 1  # texts padded to a multiple of this many tokens (at most max_text_len)
    answers: int = 0  # VQA: the size of the answer set

    def __call__(self, samples: list[dict[str, Any]]) -> Batch:
        batch: Batch = {"keys": [s["key"] for s in samples]}
        if self.task.modality == "image":
            batch["images"] = torch.stack([s["input"] for s in samples])  # (B, 3, S, S) uint8
            if "erase" in samples[0]:
                batch["erase"] = torch.tensor([s["erase"] for s in samples], dtype=torch.long)  # (B, 4)
        elif self.task.modality == "video":
            if self.train:
                batch["videos"] = torch.stack([s["input"] for s in samples])  # (B, T, 3, S, S)
            else:
                batch["videos"] = torch.cat([s["input"] for s in samples])  # (B * views, T, 3, S, S)
                batch["num_views"] = samples[0]["input"].shape[0]
        if "label" in samples[0]:
            batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
        if "targets" in samples[0]:  # VQA training: each answer's score
            scores = torch.zeros(len(samples), self.answers)
            for row, sample in enumerate(samples):
                for i, score in sample["targets"]:
                    scores[row, i] = score
            batch["answer_scores"] = scores
        if "answers" in samples[0]:
            batch["answers"] = [s["answers"] for s in samples]
            batch["answer_types"] = [s["answer_type"] for s in samples]
        if "text" in samples[0]:
            ids, padding = get_tokenizer().encode_batch([s["text"] for s in samples], max_len=self.max_text_len)
            ids, padding = _bucketed(ids, padding, self.text_multiple, self.max_text_len)
            batch["text_ids"], batch["text_padding"] = ids, padding
        if "ids" in samples[0]:  # text classification, VQA: prompts tokenized (and cut around their slot) per sample
            ids, padding = _bucketed(*pad_rows([s["ids"] for s in samples]), self.text_multiple, self.max_text_len)
            batch["text_ids"], batch["text_padding"] = ids, padding
            batch["slots"] = (ids == SPE_ID).int().argmax(dim=1)  # each prompt's first <|spe|>: its answer's slot
        if "captions" in samples[0]:
            batch["captions"] = [s["captions"] for s in samples]
        return batch


def _bucketed(ids: torch.Tensor, padding: torch.Tensor, multiple: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text ids and padding (B, L) padded on the right to a multiple of ``multiple`` tokens, at most ``limit`` (or
    L): fewer distinct shapes for a compiled model."""
    length = ids.shape[1]
    target = max(length, min(-(-length // multiple) * multiple, limit))
    if target == length:
        return ids, padding
    return F.pad(ids, (0, target - length)), F.pad(padding, (0, target - length), value=True)


# ---------------------------------------------------------------------------------------------------- shards


# A tar is a sequence of 512-byte blocks: each member is one header block, then its data padded to whole blocks.
BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
CHUNK = 1 << 20  # bytes read from the stream at a time
# Compressed tars, as tarfile's "r|*" tells them: magic bytes -> a streaming decompressor.
DECOMPRESSORS: dict[re.Pattern[bytes], Callable[[], Any]] = {
    re.compile(rb"\x1f\x8b\x08"): lambda: zlib.decompressobj(zlib.MAX_WBITS | 16),
    re.compile(rb"BZh[1-9]1AY&SY"): bz2.BZ2Decompressor,
    re.compile(rb"\xfd7zXZ\x00"): lzma.LZMADecompressor,
}
PAX_TYPES = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE)  # pax fields of the next member
# Headers that describe other members rather than being one: pax, global pax, GNU long name and link.
EXTENSION_TYPES = (*PAX_TYPES, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: not a sample's file


class _Unread(bytes):
    """The data of a member passed over unread."""


UNREAD = _Unread()  # equals b""


class _Wanted:
    """Which members' data to read: none while a resumed stream passes over what was trained on, then all."""

    def __init__(self) -> None:
        self.live = False

    def __contains__(self, ext: object) -> bool:
        return self.live


class _Shuffle:
    """webdataset's ``shuffle`` (the same draws), with its buffer in view so a resumed stream can fill in the data
    of the samples it holds."""

    def __init__(self, size: int, initial: int, rng: random.Random) -> None:
        self.size, self.initial, self.rng = size, min(initial, size), rng
        self.buffer: list[dict[str, Any]] = []

    def __call__(self, data: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        buffer = self.buffer
        for sample in data:
            buffer.append(sample)
            if len(buffer) < self.size:
                with contextlib.suppress(StopIteration):
                    buffer.append(next(data))
            if len(buffer) >= self.initial:
                yield self._pick()
        while buffer:
            yield self._pick()

    def _pick(self) -> dict[str, Any]:
        k = self.rng.randint(0, len(self.buffer) - 1)
        sample = self.buffer[k]
        self.buffer[k] = self.buffer[-1]
        self.buffer.pop()
        return sample


@dataclass
class _Cursor:
    """Where a worker's stream is: the epoch of the sample it last yielded, and that epoch's shuffle."""

    epoch: int
    shuffle: _Shuffle | None = None


class _Bytes:
    """A (non-seekable) stream read in large chunks, decompressed when it is a gzip, bzip2 or xz file."""

    def __init__(self, stream: BinaryIO) -> None:
        self.chunks = self._chunks(stream)
        self.buffer, self.pos = b"", 0

    @staticmethod
    def _chunks(stream: BinaryIO) -> Iterator[bytes]:
        chunk = stream.read(CHUNK)
        # A plain tar starts with a valid header, whatever its first file's name looks like ("BZh...").
        compressed = _header(chunk[:BLOCK]) is None
        decompressor = next((make() for magic, make in DECOMPRESSORS.items() if compressed and magic.match(chunk)),
                            None)
        while chunk:
            yield decompressor.decompress(chunk) if decompressor is not None else chunk
            chunk = stream.read(CHUNK)

    def read(self, size: int) -> bytes:
        """The next ``size`` bytes; fewer only where the stream ends."""
        end = self.pos + size
        if end <= len(self.buffer):  # the common case: a header or small member inside the current chunk
            data, self.pos = self.buffer[self.pos : end], end
            return data
        parts = [self.buffer[self.pos :]]
        size -= len(parts[0])
        self.buffer, self.pos = b"", 0
        for chunk in self.chunks:
            if size <= len(chunk):
                parts.append(chunk[:size])
                self.buffer, self.pos = chunk, size
                break
            parts.append(chunk)
            size -= len(chunk)
        return b"".join(parts)

    def skip(self, size: int) -> int:
        """Pass over the next ``size`` bytes (read: the stream cannot seek); returns how many there were."""
        return len(self.read(size))


class _File:
    """A plain tar in a local file, read unbuffered (a header read does not read ahead into the data after it):
    what is skipped is seeked past, never read."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.read, self.size = file, file.read, os.fstat(file.fileno()).st_size

    def skip(self, size: int) -> int:
        start = self.file.tell()
        return self.file.seek(min(start + size, self.size)) - start


def _reader(stream: BinaryIO, seek: bool) -> _Bytes | _File:
    """Where to read a tar from: with ``seek``, a plain tar in a local file is seeked in; else it is streamed."""
    file = getattr(stream, "raw", stream)  # under the buffer, which the stream has not read into yet
    if seek and callable(getattr(file, "seekable", None)) and file.seekable():
        plain = _header(file.read(BLOCK)) is not None
        file.seek(0)
        if plain:
            return _File(file)
    return _Bytes(stream)


def _header(block: bytes) -> tarfile.TarInfo | None:
    """The member a header block describes; None where the block is not a valid header (bad checksum)."""
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return None


def _pax_fields(data: bytes) -> dict[str, str]:
    """The records of a pax header, ``"%d %s=%s\\n" % (length, keyword, value)``, as tarfile reads them."""
    fields, pos = {}, 0
    while match := PAX_RECORD.match(data, pos):
        length = int(match.group(1))
        if length <= len(match.group(0)):
            raise tarfile.InvalidHeaderError("invalid pax record")
        value = data[match.end() : pos + length - 1]
        fields[match.group(2).decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return fields


def _tar_members(stream: BinaryIO, members: Container[str] | None = None
                 ) -> Iterator[tuple[str | None, bytes | None] | None]:
    """``(name, data)`` of each regular file of a tar stream, and None for each damaged stretch passed over.
    With ``members``, a file of another extension is passed over (data :data:`UNREAD`), seeked past in a local file.
    A stream cut short ends with ``(name, None)``: it ends inside this file's data, or, name None, inside a
    header, inside the data of one (a pax or long-name header, which names the file after it) or before the
    archive's end (the two or more zero blocks that end a tar).

    A block that is not a valid header (bad checksum) where one should be starts a damaged stretch: the blocks
    after it are tried one by one until one is a valid header again, and reading goes on there. The stretch is
    the lost member's header and data (its data blocks do not pass as headers). Zero blocks alone are the end
    (or the gap between concatenated tars), not damage, except one zero block between two headers: a header
    wiped out. Pax and GNU long-name headers name the member that follows, as in tarfile; global pax headers
    are ignored.

    Raises:
        tarfile.ReadError: the stream holds no valid header (not a tar).
    """
    data = _reader(stream, members is not None)
    fields: dict[str, str] = {}  # from pax or GNU long-name headers, for the next member
    garbage = False  # a block passed over since the last valid header was not a zero block
    zeros = 0  # zero blocks in a row just passed over
    valid = False
    while len(header := data.read(BLOCK)) == BLOCK:
        info = _header(header)
        if info is None:
            zeros = zeros + 1 if header == ZERO_BLOCK else 0
            garbage |= not zeros
            continue
        if garbage or zeros == 1:
            yield None
            fields = {}
        garbage, zeros, valid = False, 0, True
        size = info.size if info.type in EXTENSION_TYPES else int(fields.get("size", info.size))
        name, padding = fields.get("path", info.name), -size % BLOCK
        wanted = members is None or info.type in EXTENSION_TYPES or (base_plus_ext(name)[1] or "").lower() in members
        content = data.read(size) if wanted else UNREAD
        if (len(content) if wanted else data.skip(size)) < size or data.skip(padding) < padding:
            yield (name if info.isreg() else None), None
            return
        if info.type in PAX_TYPES:
            fields.update(_pax_fields(content))
        elif info.type == tarfile.GNUTYPE_LONGNAME:
            fields["path"] = content.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif info.type not in EXTENSION_TYPES:
            if info.isreg():
                yield name, content
            fields = {}
    if not valid:
        if garbage or not zeros:
            raise tarfile.ReadError("not a tar file")
        return  # only zero blocks: an empty archive
    if garbage:
        yield None  # the last member's header was damaged
    if zeros < 2 or header.strip(b"\0"):  # no end, or a cut in the header of a tar concatenated after
        yield None, None


@dataclass
class _Group:
    """The members of one sample key, as webdataset's ``group_by_keys`` gathers them, and where damaged stretches
    of the tar or its end touched them."""

    sample: dict[str, Any]  # __key__, __url__, then lower-case extension -> bytes
    damaged: bool  # a damaged stretch lies before it (since the previous group) or between two of its members
    lost_after: bool = False  # ... between it and the next group (or the tar's end)
    cut: bool = False  # the stream ends inside it, or right after it inside a header: it may be incomplete

    @property
    def key(self) -> str:
        return self.sample["__key__"]

    @property
    def members(self) -> frozenset[str]:
        return frozenset(ext for ext in self.sample if not ext.startswith("__"))


def _groups(members: Iterator[tuple[str | None, bytes | None] | None], url: str,
            damage: Counter[str]) -> Iterator[_Group]:
    """Consecutive members with the same key (the name up to its first ``.`` after the last ``/``) as groups.
    A shard that cannot be read to its end counts once as unreadable; the groups read are yielded, the last one
    marked ``cut`` where the stream may end inside it."""
    group: _Group | None = None
    lost = False  # a damaged stretch since the last member
    try:
        for member in members:
            if member is None:
                lost = True
                continue
            name, content = member
            if content is None:  # the stream ends inside this member (name None: inside a header)
                damage[UNREADABLE_SHARD] = 1
                if group is not None:
                    group.lost_after = lost
                    group.cut = name is None or base_plus_ext(name)[0] == group.key
                    yield group
                return
            key, ext = base_plus_ext(name)
            if key is None or META_MEMBER.match(name):
                continue
            ext = ext.lower()
            if group is not None and key == group.key:
                if ext in group.sample:
                    raise ValueError(f"{name}: repeated member in {url}")
                group.damaged |= lost
            else:
                if group is not None:
                    group.lost_after = lost
                    yield group
                group = _Group({"__key__": key, "__url__": url}, damaged=lost)
            group.sample[ext] = content
            lost = False
    except Exception:  # noqa: BLE001 - not a tar, an I/O error, a repeated member: all end the shard
        damage[UNREADABLE_SHARD] = 1
        return
    if group is not None:
        group.lost_after = lost
        yield group


def _listing(shard: Shard) -> dict[str, frozenset[str]] | None:
    """Key -> member extensions of every sample of a shard, in order, from the stats file that prepare-data
    writes next to it; None where there is none (a remote shard, a tar from elsewhere, or stats written before
    they listed members)."""
    if shard.remote:
        return None
    try:
        stats = shard_stats(shard.url)
        return {key: frozenset(ext.lower() for ext in exts)
                for key, exts in zip(stats["keys"], stats["members"], strict=True)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _listed(groups: Iterable[_Group], listing: dict[str, frozenset[str]],
            damage: Counter[str]) -> Iterator[dict[str, Any]]:
    """The samples of ``groups`` that have every member ``listing`` gives them. A listed sample that lost a
    member (or all of them) to damage counts once as ``"unreadable member"``; one lost where the stream is cut
    counts with the shard. A group whose key is not listed (or not after the last one met) is a name read from
    a damaged header: it is left out, as part of the damage."""
    position = {key: i for i, key in enumerate(listing)}
    met = 0  # listed samples met or passed
    damaged_end = False  # damage after the last listed sample met
    for group in groups:
        i = position.get(group.key, -1)
        if i < met:
            damaged_end = True
            continue
        if i > met:
            damage[UNREADABLE_MEMBER] += i - met  # listed samples never met: every member lost
        met, damaged_end = i + 1, group.lost_after
        if group.members == listing[group.key]:
            yield group.sample
        elif not group.cut:
            damage[UNREADABLE_MEMBER] += 1
    if met < len(listing) and not damage[UNREADABLE_SHARD]:  # the tar ends properly, before its last samples
        if damaged_end:
            damage[UNREADABLE_MEMBER] += len(listing) - met
        else:
            damage[UNREADABLE_SHARD] = 1  # it holds fewer samples than its stats list


def _undamaged(groups: Iterable[_Group], damage: Counter[str]) -> Iterator[dict[str, Any]]:
    """The samples of ``groups`` that no damage touched, for a shard without a listing. A damaged stretch
    between two samples may have been the last member of the one before, the first of the one after, or whole
    samples: both neighbours are dropped and each counts once as ``"unreadable member"`` (samples lost whole
    are not seen). A group the stream may be cut inside is dropped and counts with the shard."""
    for group in groups:
        if group.damaged or group.lost_after:
            damage[UNREADABLE_MEMBER] += 1
        elif not group.cut:
            yield group.sample


def read_shards(shards: Iterable[Shard], skipped: Counter[str], members: Container[str] | None = None,
                timeout: float = STREAM_TIMEOUT) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__``, ``__url__``, extension -> bytes) of each shard in turn, read past damage;
    the damage is counted into ``skipped`` once the shard is done. With ``members``, only these extensions' data
    is read: the others map to :data:`UNREAD` (and are seeked past in a local plain tar). A shard that cannot be opened
    or read on (a 404, a dropped connection, an http(s) stream stalled for ``timeout`` seconds, a pipe that
    fails) counts as ``"unreadable shard"``.

    A shard with a stats file that lists its samples' keys and members (:func:`_listing`) is checked against
    it, so exactly the samples that lost a member are left out; one without is read by a cautious rule
    (:func:`_undamaged`)."""
    for shard in shards:
        damage: Counter[str] = Counter()
        read = 0
        stream = None
        try:
            listing = _listing(shard)
            stream = open_shard(shard, timeout)
            groups = _groups(_tar_members(stream, members), shard.url, damage)
            for sample in _listed(groups, listing, damage) if listing is not None else _undamaged(groups, damage):
                read += 1
                yield sample
            if listing is None and shard.samples is not None and not damage and read < shard.samples:
                damage[UNREADABLE_SHARD] = 1  # it ends properly but holds fewer samples than its manifest says
        except Exception:  # noqa: BLE001 - a shard that cannot be opened (missing, I/O) is counted
            damage[UNREADABLE_SHARD] = 1
        finally:
            if stream is not None:
                _close(stream, damage)
            skipped.update(damage)


def _close(stream: BinaryIO, damage: Counter[str]) -> None:
    """Close a shard's stream; one that fails to close (a pipe's command exits with an error) is unreadable."""
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - whatever the stream raises, the shard is counted, never fatal
        damage[UNREADABLE_SHARD] = 1


class ShardStream(IterableDataset):
    """The per-process sample stream: shard split, read, subset, shuffle, decode, batch. ``shards`` are every
    shard of the split in the manifest's order, ``subset`` the ``(shard file name, key)`` pairs to keep (None:
    all); the other arguments are :func:`make_loader`'s.

    Each batch carries its :data:`POSITION` in its worker's stream: the worker, the samples the stream has
    handed to decoding, and the state of its random draws. A stream given such positions (``resume``, by
    :meth:`ShardLoader.restore`) passes over the samples before them reading only tar headers (no data, no
    decoding) and goes on exactly where they left off.
    """

    def __init__(self, shards: Sequence[Shard], decoder: SampleDecoder, collate: Collate, *, batch_size: int,
                 train: bool, seed: int, epochs: int | None, shuffle_buffer: int,
                 subset: Subset | None, rank: int, world_size: int,
                 stream_timeout: float) -> None:
        super().__init__()
        self.shards, self.decoder, self.collate = list(shards), decoder, collate
        self.batch_size, self.train, self.seed, self.epochs = batch_size, train, seed, epochs
        self.shuffle_buffer, self.subset, self.rank, self.world_size = shuffle_buffer, subset, rank, world_size
        self.stream_timeout = stream_timeout
        self.first_epoch = 0  # set by ShardLoader: the k-th iteration continues where the previous one ended
        self.resume: dict[int, dict[str, Any]] = {}  # worker -> the position to go on from (ShardLoader.restore)
        self.rotation = 0  # a resumed loader's first batch comes from worker ``rotation``

    def epoch_order(self, epoch: int) -> list[Shard]:
        """Every shard in the order of ``epoch``: shuffled in training, the same on every process."""
        order = list(self.shards)
        if self.train:
            random.Random(f"{self.seed}/shards/{epoch}").shuffle(order)
        return order

    def _epoch(self, epoch: int, worker: int, num_workers: int, skipped: Counter[str],
               members: Container[str] | None, seen: list[int]) -> Iterator[dict[str, Any]]:
        """This reader's raw samples of ``epoch``; ``seen[0]`` counts the samples of the epoch read.

        With at least as many shards as readers (processes x workers) each reader reads its own shards;
        with fewer, every reader reads all of them and keeps every ``readers``-th sample (small data sets).
        Either way each epoch's samples are split exactly once.
        """
        readers, reader = self.world_size * num_workers, self.rank * num_workers + worker
        split_shards = len(self.shards) >= readers
        # Reading every shard, every reader meets the same damaged shards: only reader 0 counts them.
        shard_skips = skipped if split_shards or reader == 0 else Counter()
        order = self.epoch_order(epoch)
        mine = order[reader::readers] if split_shards else order
        for sample in read_shards(mine, shard_skips, members, timeout=self.stream_timeout):
            if self.subset is not None:
                entry = (Path(sample["__url__"]).name, sample["__key__"])
                if entry not in self.subset:
                    continue
                if self.subset[entry] is not None:
                    sample[CAPTIONS] = self.subset[entry]
            seen[0] += 1
            if split_shards or (seen[0] - 1) % readers == reader:
                yield sample

    def _samples(self, worker: int, num_workers: int, skipped: Counter[str], members: Container[str] | None,
                 name: str, cursor: _Cursor) -> Iterator[dict[str, Any]]:
        """This reader's raw samples, epoch after epoch from ``cursor.epoch``; in training each epoch shuffled by
        itself (webdataset's algorithm, its own draws per epoch), so a resumed stream can start at any epoch.
        ``cursor`` follows the epoch of the sample last yielded and its shuffle."""
        first = cursor.epoch
        last = None if self.epochs is None else self.first_epoch + self.epochs
        for epoch in count(first) if last is None else range(first, last):
            seen = [0]
            samples = self._epoch(epoch, worker, num_workers, skipped, members, seen)
            cursor.epoch, cursor.shuffle = epoch, None
            if self.train:
                cursor.shuffle = _Shuffle(self.shuffle_buffer, 100, random.Random(f"{name}/order/{epoch}"))
                samples = cursor.shuffle(samples)
            yield from samples
            if seen[0] == 0:  # every shard of this reader failed: stop instead of spinning through empty epochs
                return

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (physical + self.rotation) % num_workers
        name = f"{self.seed}/{self.first_epoch}/{self.rank}/{worker}"
        rng = random.Random(name)  # caption choice, video clips
        skipped: Counter[str] = Counter()
        resume = self.resume.get(worker)
        if resume is None:
            if info is not None and worker != physical:  # the seeds the DataLoader gives worker ``worker``
                base = torch.initial_seed() - physical
                random.seed(base + worker)
                torch.manual_seed(base + worker)
                np.random.seed(_generate_state(base, worker))
            cursor = _Cursor(self.first_epoch)
            samples = self._samples(worker, num_workers, skipped, None, name, cursor)
            return self._batches(samples, worker, rng, skipped, cursor, 0)
        cursor = _Cursor(resume["epoch"])
        wanted = _Wanted()
        samples = self._samples(worker, num_workers, skipped, wanted, name, cursor)
        for _ in zip(range(resume["in_epoch"]), samples, strict=False):  # tar headers only
            if cursor.epoch != resume["epoch"]:
                raise ValueError(f"a resumed data position lies beyond the end of its epoch in {self.shards[0].url}'s "
                                 "split: the data changed since the checkpoint was written")
        wanted.live = True
        skipped.clear()
        rng.setstate(python_state(resume["rng"]))
        if "global" in resume:  # a worker's own torch, Python and numpy generators (image augmentation)
            set_global_rng_state(resume["global"])
        return self._batches(samples, worker, rng, skipped, cursor, resume["in_epoch"])

    def _batches(self, samples: Iterator[dict[str, Any]], worker: int, rng: random.Random, skipped: Counter[str],
                 cursor: _Cursor, in_epoch: int) -> Iterator[dict[str, Any]]:
        """Decode and batch (one collate call per batch); each batch carries the skip counts since the last one
        and its position, and one last count-only item follows the last batch."""
        filled: dict[tuple[str, str], dict[str, Any]] = {}
        in_worker = get_worker_info() is not None
        epoch = cursor.epoch
        batch: list[dict[str, Any]] = []
        for raw in samples:
            if cursor.epoch != epoch:
                epoch, in_epoch = cursor.epoch, 0
            in_epoch += 1
            try:
                if any(isinstance(v, _Unread) for v in raw.values()):
                    raw = self._fill(raw, filled, cursor.shuffle)
                batch.append(self.decoder(raw, rng))
            except Skip as e:
                skipped[e.reason] += 1
                continue
            if len(batch) == self.batch_size:
                yield self._batch(batch, skipped, {"worker": worker, "epoch": epoch, "in_epoch": in_epoch}, rng,
                                  in_worker)
                batch = []
        if batch:
            yield self._batch(batch, skipped, {"worker": worker, "epoch": epoch, "in_epoch": in_epoch}, rng, in_worker)
        yield {SKIPPED: dict(skipped)}

    def _batch(self, samples: list[dict[str, Any]], skipped: Counter[str], position: dict[str, Any],
               rng: random.Random, in_worker: bool) -> dict[str, Any]:
        batch: dict[str, Any] = dict(self.collate(samples))
        batch[SKIPPED] = dict(skipped)
        skipped.clear()
        batch[POSITION] = {**position, "rng": rng.getstate()}
        if in_worker:  # in the main process these are the run's own, which its checkpoint keeps
            batch[POSITION]["global"] = global_rng_state()
        return batch

    def _fill(self, raw: dict[str, Any], filled: dict[tuple[str, str], dict[str, Any]],
              shuffle: _Shuffle | None) -> dict[str, Any]:
        """The data of a sample met while passing over (its members were not read): its shard is read again for
        it and for every such sample still in the shuffle buffer."""
        key = (raw["__url__"], raw["__key__"])
        if key not in filled:
            pending = {(s["__url__"], s["__key__"]) for s in (shuffle.buffer if shuffle else [])
                       if s["__url__"] == key[0] and any(isinstance(v, _Unread) for v in s.values())} | {key}
            shard = next(s for s in self.shards if s.url == key[0])
            for sample in read_shards([shard], Counter(), timeout=self.stream_timeout):
                if (sample["__url__"], sample["__key__"]) in pending:
                    filled[(sample["__url__"], sample["__key__"])] = sample
        if key not in filled:
            raise Skip(UNREADABLE_MEMBER)
        sample = filled.pop(key)
        if CAPTIONS in raw:  # a caption-pair subset's draw, made when the sample was first met
            sample[CAPTIONS] = raw[CAPTIONS]
        return sample


def _is_position(worker: Any, position: Any, num_workers: int) -> bool:
    """Whether ``position`` is one ``worker``'s batch carried (its worker, epoch, samples into it, random state)."""
    return isinstance(worker, int) and 0 <= worker < max(num_workers, 1) and isinstance(position, dict) \
        and position.get("worker") == worker and "rng" in position \
        and all(isinstance(position.get(k), int) and position[k] >= 0 for k in ("epoch", "in_epoch"))


class ShardLoader:
    """Iterable of batch dicts over a :class:`ShardStream`, run by a ``torch.utils.data.DataLoader``.

    Attributes:
        skipped: reason -> count of the samples and shards skipped so far, over every iteration.
        subset: the ``(shard file name, key)`` pairs of the 1% subset (each with its chosen captions), or None.
        batches: batches handed out so far.
    """

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool = False) -> None:
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.skipped: Counter[str] = Counter()
        self.subset = stream.subset
        self.batches = 0
        self.positions: dict[int, dict[str, Any]] = {}  # worker -> the position of its last batch handed out
        self._resume = False

    def state(self) -> dict[str, Any]:
        """Where the loader stands: what :meth:`restore` takes to go on from here."""
        return {"batches": self.batches, "positions": dict(self.positions), "skipped": dict(self.skipped),
                "workers": self.num_workers, "processes": self.stream.world_size}

    def restore(self, state: dict[str, Any]) -> None:
        """Go on from :meth:`state` at the next iteration, without reading again what was handed out.

        Raises:
            ValueError: the state was written with another number of workers or processes (they split the
                shards), or is not one.
        """
        written = (state.get("workers"), state.get("processes"))
        if written != (self.num_workers, self.stream.world_size):
            raise ValueError(f"its data positions were written with {written[0]} loader worker(s) in each of "
                             f"{written[1]} process(es), and this run has {self.num_workers} in each of "
                             f"{self.stream.world_size}: resume with the train.num_workers and processes it had")
        positions = state["positions"]
        if not isinstance(positions, dict) or \
                not all(_is_position(w, p, self.num_workers) for w, p in positions.items()):
            raise ValueError("its data positions are not ones this loader wrote")
        self.batches, self.positions = int(state["batches"]), dict(positions)
        self.skipped = Counter(state["skipped"])
        self._resume = True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = self.stream
        stream.resume = self.positions if self._resume else {}
        stream.rotation = self.batches % max(self.num_workers, 1) if self._resume else 0
        self._resume = False
        seed = hash((stream.seed, stream.rank, stream.first_epoch)) % 2**63  # the workers' augmentation RNGs
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            generator=torch.Generator().manual_seed(seed))
        try:
            for batch in loader:
                self.skipped.update(batch.pop(SKIPPED))
                position = batch.pop(POSITION, None)
                if batch:
                    self.batches += 1
                    self.positions[position["worker"]] = position
                    yield batch
        finally:
            if stream.epochs is not None:
                stream.first_epoch += stream.epochs


# ---------------------------------------------------------------------------------------------------- subset


def shard_stats(url: str) -> dict[str, Any]:
    """The stats file prepare-data writes next to a local shard (samples, keys, members, labels). ValueError where
    there is none or it resolves outside the shard's folder."""
    path = Path(url).with_suffix(".json")
    if not path.resolve().is_relative_to(path.parent.resolve()):
        raise ValueError(f"stats file {path} resolves to {path.resolve()}, outside its split folder")
    if not path.is_file():
        raise ValueError(f"no stats file {path} (written next to each tar by prepare-data)")
    return read_json(path, "shard stats file")


def choose_subset(shard_urls: Sequence[str], fraction: float, seed: int, *, balanced: bool,
                  captions: bool = False) -> Subset:
    """The reference's 1%-data subset, drawn once from ``seed`` (the same in every process) from the local shards'
    stats files (``keys``, ``labels``): ``balanced``, ``int(fraction * n_c) + 1`` samples of each class
    (classification); with ``captions``, ``int(fraction * P)`` of the P (item, caption) pairs, as the reference draws
    its caption and retrieval data (an item enters with the captions drawn for it); else ``int(fraction * N)`` of
    all samples. Returns the chosen ``(shard file name, key)`` pairs, each with its chosen caption indices (None:
    the sample as it is). ValueError on a fraction outside (0, 1], a missing stats file, unlabelled samples in a
    balanced draw, or an empty subset."""
    if not 0 < fraction <= 1:
        raise ValueError(f"subset must be a fraction in (0, 1], got {fraction}")
    entries: list[tuple[str, str]] = []
    labels: list[int | None] = []
    for url in shard_urls:
        try:
            stats = shard_stats(url)
        except ValueError as e:
            raise ValueError(f"subset needs the shard's stats file: {e}") from None
        entries += [(Path(url).name, key) for key in stats["keys"]]
        labels += stats["labels"]
    rng = random.Random(seed)
    chosen: Subset = {}
    if balanced:
        if any(label is None for label in labels):
            raise ValueError("a class-balanced subset needs a label for every sample; the shards have unlabelled ones")
        by_class: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for entry, label in zip(entries, labels, strict=True):
            by_class[label].append(entry)
        for label in sorted(by_class):
            members = by_class[label]
            chosen.update(dict.fromkeys(rng.sample(members, min(len(members), int(fraction * len(members)) + 1))))
    elif captions:
        counts = {entry: count for url in shard_urls for entry, count in _caption_counts(url).items()}
        pairs = [(entry, i) for entry in entries for i in range(counts.get(entry, 1))]
        picked: dict[tuple[str, str], list[int]] = defaultdict(list)
        for entry, i in rng.sample(pairs, int(fraction * len(pairs))):
            picked[entry].append(i)
        chosen = {entry: tuple(sorted(indices)) for entry, indices in sorted(picked.items())}
    else:
        chosen = dict.fromkeys(rng.sample(entries, int(fraction * len(entries))))
    if not chosen:
        raise ValueError(f"a {fraction} subset of {len(entries)} samples is empty")
    return chosen


def _caption_counts(url: str) -> dict[tuple[str, str], int]:
    """How many captions each sample of a local shard holds (its json's ``captions``; 1 without), its json members
    read as the stream reads them. A sample whose json the loader would skip, or that damage loses, counts 1."""
    counts = {}
    for raw in read_shards([Shard(url)], Counter(), members={"json"}):
        if "json" not in raw:
            continue  # no json, one caption (the draw's default)
        try:
            found = sample_json(raw).get("captions")
        except Skip:
            continue  # the loader skips it as "bad json"
        counts[(Path(url).name, raw["__key__"])] = len(found) if isinstance(found, list) and found else 1
    return counts


# ---------------------------------------------------------------------------------------------------- entry


def _shards(source: str | Path | Sequence[str]) -> list[Shard]:
    """A folder's shards (local files, checked to lie in it), or the URLs or paths of a pattern or list (a string or
    list, never a ``Path``: a recipe's folder is a ``Path`` and is never expanded as a pattern)."""
    if isinstance(source, Path) and not source.is_dir():
        raise FileNotFoundError(f"{source} is not a shard folder (a folder with manifest.json)")
    if isinstance(source, str) and is_split_url(source):  # a split's URL: its manifest names the shards
        manifest = Manifest.load(source)
        return [Shard(url, s.samples, remote=True) for url, s in zip(shard_urls(source, manifest), manifest.shards,
                                                                          strict=True)]
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        directory = Path(source)
        manifest = Manifest.load(directory)
        shards = [Shard(str(shard_path(directory, s.file)), s.samples) for s in manifest.shards]
        missing = [s.url for s in shards if not Path(s.url).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) named in {directory / 'manifest.json'} are missing, "
                                    f"e.g. {missing[0]}")
        return shards
    urls = expand_urls(str(source)) if isinstance(source, (str, Path)) else [str(url) for url in source]
    return [Shard(url, remote=is_remote(url)) for url in urls]


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def make_loader(
    source: str | Path | Sequence[str],
    *,
    task: str,
    batch_size: int,
    train: bool,
    image_size: int,
    num_frames: int = 8,
    num_views: int = 1,
    num_clips: int = 1,
    max_text_len: int | None = None,
    seed: int = 0,
    subset: float | None = None,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    epochs: int | None = 1,
    label_set: str | None = None,
    augment: bool = True,
    frame_stride: float = STRIDE,
    rank: int | None = None,
    world_size: int | None = None,
    stream_timeout: float = STREAM_TIMEOUT,
    pin_memory: bool = False,
    text_multiple: int = 1,
    answers: Sequence[str] = (),
    subset_by: str = "caption",
) -> ShardLoader:
    """A streaming loader of task batches from WebDataset shards.

    Args:
        source: a shard folder with ``manifest.json``, a webdataset URL pattern (``"dir/shard-{000000..000007}.tar"``)
            or a list of shard URLs. URLs and pipes (:func:`is_remote`) need ``UNIPERCEIVER_STREAMING=1``.
        task: one of :data:`uniperceiver_cli.task_types.TASKS`.
        batch_size: samples per batch (the last batch of each worker may be smaller).
        train: training (shuffled shards and samples, random augmentation, random caption) or evaluation
            (listed order, deterministic transforms, first caption).
        image_size: output side ``S`` of images and video frames.
        num_frames: frames per video clip, ``T``.
        num_views: spatial crops per video in evaluation, 1 (centre) or 3 (start, centre, end).
        num_clips: temporal clips per video in evaluation (the reference's multi-view).
        max_text_len: keep at most this many text ids (the last one, EOT, is kept); default 128 for
            ``text_mlm``, 256 for text classification, 23 for VQA, 30 otherwise.
        seed: seed of shard order, sample shuffle, augmentation and subset.
        subset: keep only this fraction of the data, chosen once from ``seed`` and the same in every process:
            class-balanced for classification, of the (item, caption) pairs for captioning and retrieval (see
            ``subset_by``), a uniform draw of the samples otherwise. Needs local shards with their stats
            files. The reference used it for training only (the 1% prompt-tuning protocol).
        num_workers: DataLoader worker processes.
        shuffle_buffer: samples held for shuffling in training.
        epochs: passes over the data per iteration of the loader; None repeats forever. Processes may get
            different numbers of batches per epoch (shards differ in size), so distributed training runs by
            steps over ``epochs=None``.
        label_set: classification labels from ``json["labels"][label_set]`` instead of ``cls``.
        augment: in training, random augmentation (the reference's); False gives training samples the
            evaluation transform (synthetic data whose colours, sides and positions carry labels).
        frame_stride: source frames between sampled video frames at 30 fps (the reference's 32; it is scaled
            by the video's frame rate).
        rank: this process's index; default from ``RANK`` / ``WORLD_SIZE`` or ``torch.distributed``.
        world_size: number of processes sharing the data.
        stream_timeout: seconds an http(s) shard may take to answer or to send its next bytes before it is
            skipped as unreadable; ``UNIPERCEIVER_STREAM_TIMEOUT`` overrides it.
        pin_memory: put the batches in page-locked memory (for a GPU: faster, asynchronous copies).
        text_multiple: pad texts to a multiple of this many tokens (at most ``max_text_len``), for a compiled
            model.
        answers: VQA: the answer set (the split's classes), needed to size the answer scores and to flip.
        subset_by: captioning and retrieval subsets: of the (item, caption) pairs ("caption") or of the items.

    Returns:
        A :class:`ShardLoader` of :class:`Batch` dicts.

    Raises:
        ValueError: on an unknown task, bad sizes, a bad subset or stream timeout, a URL or pipe without
            ``UNIPERCEIVER_STREAMING=1``, or a manifest naming a shard outside its folder.
        FileNotFoundError: if a shard folder lacks its manifest or shards.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    kind = TASKS[task]
    if num_views not in VIDEO_NUM_CROPS:
        raise ValueError(f"num_views must be 1 or 3, got {num_views}")
    if min(batch_size, num_frames, num_clips, shuffle_buffer) < 1 or num_workers < 0:
        raise ValueError("batch_size, num_frames, num_clips and shuffle_buffer must be >= 1, num_workers >= 0")
    rank, world_size = _rank_and_world(rank, world_size)
    timeout = shards_stream_timeout(stream_timeout)
    shards = _shards(source)
    for shard in shards:
        if shard.remote:
            require_streaming(shard.url)
    chosen = None
    if subset is not None:
        chosen = choose_subset([s.url for s in shards], subset, seed, balanced=kind.family == "classification",
                               captions=subset_by == "caption" and kind.family in ("caption", "retrieval"))
        holding = {name for name, _ in chosen}
        shards = [s for s in shards if Path(s.url).name in holding]  # read only the shards the subset draws from
    text_len = max_text_len or {"mlm": 128, "text_classification": 256, "vqa": 23}.get(kind.family, 30)
    if kind.family == "vqa" and not answers:
        raise ValueError("a VQA loader needs the answer set (the split's classes)")
    decoder = SampleDecoder(kind, train, image_size, num_frames, num_views, num_clips, label_set, augment,
                            frame_stride, text_len, tuple(answers))
    collate = Collate(kind, train, text_len, text_multiple, len(answers))
    stream = ShardStream(shards, decoder, collate, batch_size=batch_size, train=train, seed=seed, epochs=epochs,
                         shuffle_buffer=shuffle_buffer, subset=chosen, rank=rank, world_size=world_size,
                         stream_timeout=timeout)
    return ShardLoader(stream, num_workers, pin_memory)
