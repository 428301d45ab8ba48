"""Video decoding and clip sampling for training and evaluation, as the reference's ``VideoDataSet`` did it.

Frames are decoded with decord from the bytes of a shard member (webdataset's own video decoder calls
``torchvision.io.read_video``, which torchvision 0.29 removed). Frame positions follow the reference:

- the stride between sampled frames is ``stride * fps / 30`` source frames (``STRIDE`` 32 at 30 fps);
- training: one clip from a random start in ``[0, frames - stride * (T - 1) - 1)`` (0 when the video is
  shorter), indices wrapping modulo the frame count;
- evaluation: start 0 (the reference's ``np.linspace(0, ..., num_clips)`` start list with one clip). With
  ``num_clips`` temporal views, the reference's ``MULTI_VEIW 'v2'``: ``T * num_clips`` frames at stride
  ``int(stride / num_clips)`` are interleaved, so view ``c`` starts ``c`` sub-strides later.

Decoding problems raise :class:`uniperceiver_cli.data.shards.Skip` (``"empty video"`` or
``"undecodable video"``), which the loader counts and skips. What decord and ffmpeg print while they open or
decode a video (``moov atom not found``) goes into the skip's detail instead of the terminal.
"""

from __future__ import annotations

import io
import os
import random
import re
import sys
import tempfile
from collections.abc import Callable
from typing import TypeVar

import decord
import torch

from uniperceiver_cli.data.shards import Skip
from uniperceiver_cli.model.preprocess import short_side_resize, to_uint8, video_views_uint8

STRIDE = 32  # source frames between sampled frames at 30 fps
TARGET_FPS = 30
MAX_MESSAGES = 1 << 16  # bytes of captured native messages read back
DETAIL_CHARS = 300
# decord's log lines start with the time and its source position, "[20:48:14] /path/video_reader.cc:83: ".
DECORD_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ", re.MULTILINE)
# decord prints an in-memory video's "file name": its first bytes, up to a NUL.
DECORD_FILE_NAME = re.compile(r"ERROR opening: .*?, (?=[A-Z])", re.DOTALL)

T = TypeVar("T")


def _messages(error: Exception, native: bytes) -> str:
    """The error and what native code printed, as one line (repeats and control characters dropped)."""
    text = DECORD_FILE_NAME.sub("ERROR opening: ", f"{error}\n{native.decode('utf-8', 'replace')}")
    text = DECORD_PREFIX.sub("", text)
    lines = ("".join(c for c in line if c.isprintable()).strip() for line in text.splitlines())
    return " | ".join(dict.fromkeys(line for line in lines if line))[:DETAIL_CHARS]


def _native(call: Callable[[], T]) -> T:
    """``call()`` with file descriptor 2 sent to a temporary file: the messages decord and ffmpeg write there
    (from C, past ``sys.stderr``) go into the detail of the ``"undecodable video"`` skip raised on a failure,
    and are dropped on success. The redirection is process-wide, so it spans only the native call."""
    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()  # what Python has buffered still goes to the terminal
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - decord raises RuntimeError and its own DECORDError
            capture.seek(0)
            raise Skip("undecodable video", _messages(error, capture.read(MAX_MESSAGES))) from error
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def open_video(data: bytes) -> decord.VideoReader:
    """A decord reader of a video file's bytes; ``Skip("empty video")`` without bytes or frames."""
    if not data:
        raise Skip("empty video")
    reader = _native(lambda: decord.VideoReader(io.BytesIO(data), num_threads=1))  # workers give the parallelism
    if len(reader) == 0:
        raise Skip("empty video")
    return reader


def _frames(reader: decord.VideoReader, indices: list[int]) -> torch.Tensor:
    """uint8 frames ``(len(indices), H, W, 3)``."""
    # decord seeks back to a keyframe for every index below the previous one; wrapped (unsorted) positions
    # decode about twice as slowly as the same positions in order.
    unique = sorted(set(indices))
    frames = torch.from_numpy(_native(lambda: reader.get_batch(unique).asnumpy()))  # a corrupt stream may fail here
    position = {index: i for i, index in enumerate(unique)}
    return frames[[position[index] for index in indices]]


def train_indices(total: int, step: float, num_frames: int, rng: random.Random) -> list[int]:
    """The reference's ``random_clip``: ``num_frames`` positions ``step`` source frames apart from a random start,
    wrapping modulo ``total`` frames."""
    highest = total - int(step * (num_frames - 1) + 1)
    start = rng.randrange(highest) if highest > 0 else 0
    return [(start + int(i * step)) % total for i in range(num_frames)]


def eval_indices(total: int, stride: float, fps: float, num_frames: int, num_clips: int = 1) -> list[list[int]]:
    """The reference's test positions: ``num_clips`` interleaved views of ``num_frames`` indices each, from start 0,
    ``stride`` given at 30 fps, wrapping modulo ``total`` frames."""
    sub_stride = int(stride / num_clips)
    flat = [int(i * sub_stride * fps / TARGET_FPS) % total for i in range(num_frames * num_clips)]
    return [flat[clip::num_clips] for clip in range(num_clips)]


def train_clip(data: bytes, size: int, num_frames: int, rng: random.Random, stride: float = STRIDE) -> torch.Tensor:
    """One training clip ``(T, 3, S, S)`` with the TimeSformer augmentation, uint8 (normalised with mean/std 0.5 on
    the device); ``Skip`` on a bad video.

    The short side is resized to a random size in ``[int(256/224*S), int(320/224*S)]`` (bilinear, in float32,
    rounded back to uint8), then one random ``S`` x ``S`` crop and one horizontal flip decision apply to every
    frame. ``rng`` draws the start, scale, flip and crop.
    """
    reader = open_video(data)
    indices = train_indices(len(reader), stride * reader.get_avg_fps() / TARGET_FPS, num_frames, rng)
    video = _frames(reader, indices).permute(0, 3, 1, 2).float().div_(255)  # (T, 3, H, W)
    short = round(rng.uniform(int(256 / 224 * size), int(320 / 224 * size)))
    video = to_uint8(short_side_resize(video, short))
    height, width = video.shape[-2:]
    top, left = rng.randint(0, height - size), rng.randint(0, width - size)
    video = video[..., top : top + size, left : left + size]
    if rng.random() < 0.5:
        video = video.flip(-1)
    return video


def eval_clip(data: bytes, size: int, num_frames: int, num_crops: int = 1, num_clips: int = 1,
              stride: float = STRIDE) -> torch.Tensor:
    """The deterministic test views ``(num_clips * num_crops, T, 3, S, S)``, row ``clip * num_crops + crop``, uint8
    (:func:`~uniperceiver_cli.model.preprocess.video_views_uint8`); ``num_crops`` 1 (centre) or 3 (start, centre,
    end of the long side). ``Skip`` on a bad video."""
    reader = open_video(data)
    clips = eval_indices(len(reader), stride, reader.get_avg_fps(), num_frames, num_clips)
    frames = _frames(reader, [i for clip in clips for i in clip])  # (clips * T, H, W, 3)
    return video_views_uint8(frames.view(num_clips, num_frames, *frames.shape[1:]), size, num_crops)

