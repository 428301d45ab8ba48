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
``"undecodable video"``), which the loader counts and skips.
"""

from __future__ import annotations

import io
import random

import decord
import torch

from uniperceiver_cli.data.shards import Skip
from uniperceiver_cli.model.preprocess import _short_side_resize, normalize_video, video_views

STRIDE = 32  # source frames between sampled frames at 30 fps
TARGET_FPS = 30


def _open(data: bytes) -> decord.VideoReader:
    if not data:
        raise Skip("empty video")
    try:
        reader = decord.VideoReader(io.BytesIO(data), num_threads=1)  # one thread: workers give the parallelism
    except Exception as error:  # noqa: BLE001 - decord raises RuntimeError and its own DECORDError
        raise Skip("undecodable video", str(error)[:200]) from error
    if len(reader) == 0:
        raise Skip("empty video")
    return reader


def _frames(reader: decord.VideoReader, indices: list[int]) -> torch.Tensor:
    """uint8 frames ``(len(indices), H, W, 3)``."""
    # decord seeks back to a keyframe for every index below the previous one; wrapped (unsorted) positions
    # decode about twice as slowly as the same positions in order.
    unique = sorted(set(indices))
    try:
        frames = torch.from_numpy(reader.get_batch(unique).asnumpy())
    except Exception as error:  # noqa: BLE001 - a corrupt stream fails only when its frames are read
        raise Skip("undecodable video", str(error)[:200]) from error
    position = {index: i for i, index in enumerate(unique)}
    return frames[[position[index] for index in indices]]


def _step(reader: decord.VideoReader, stride: float) -> float:
    return stride * reader.get_avg_fps() / TARGET_FPS


def train_indices(total: int, step: float, num_frames: int, rng: random.Random) -> list[int]:
    """The reference's ``random_clip``: ``num_frames`` positions ``step`` apart from a random start.

    Args:
        total: frames in the video.
        step: source frames between sampled frames.
        num_frames: frames in the clip, ``T``.
        rng: the random start's generator.

    Returns:
        ``T`` frame indices, wrapping modulo ``total``.
    """
    highest = total - int(step * (num_frames - 1) + 1)
    start = rng.randrange(highest) if highest > 0 else 0
    return [(start + int(i * step)) % total for i in range(num_frames)]


def eval_indices(total: int, stride: float, fps: float, num_frames: int, num_clips: int = 1) -> list[list[int]]:
    """The reference's test positions: start 0, ``num_clips`` interleaved temporal views.

    Args:
        total: frames in the video.
        stride: the stride at 30 fps (``STRIDE``).
        fps: the video's frame rate.
        num_frames: frames per view, ``T``.
        num_clips: temporal views.

    Returns:
        ``num_clips`` lists of ``T`` frame indices, wrapping modulo ``total``.
    """
    sub_stride = int(stride / num_clips)
    flat = [int(i * sub_stride * fps / TARGET_FPS) % total for i in range(num_frames * num_clips)]
    return [flat[clip::num_clips] for clip in range(num_clips)]


def train_clip(data: bytes, size: int, num_frames: int, rng: random.Random, stride: float = STRIDE) -> torch.Tensor:
    """Decode one training clip with the TimeSformer augmentation.

    The short side is resized to a random size in ``[int(256/224*S), int(320/224*S)]`` (bilinear), then one
    random ``S`` x ``S`` crop and one horizontal flip decision apply to every frame; pixels are normalised with
    mean/std 0.5.

    Args:
        data: the video file's bytes.
        size: output side ``S``.
        num_frames: frames in the clip, ``T``.
        rng: generator of the start, scale, flip and crop.
        stride: source frames between sampled frames at 30 fps.

    Returns:
        Float tensor ``(T, 3, S, S)``.

    Raises:
        Skip: on an empty or undecodable video.
    """
    reader = _open(data)
    indices = train_indices(len(reader), _step(reader, stride), num_frames, rng)
    video = _frames(reader, indices).permute(0, 3, 1, 2).float().div_(255)  # (T, 3, H, W)
    short = round(rng.uniform(int(256 / 224 * size), int(320 / 224 * size)))
    video = _short_side_resize(video, short)
    height, width = video.shape[-2:]
    top, left = rng.randint(0, height - size), rng.randint(0, width - size)
    video = video[..., top : top + size, left : left + size]
    if rng.random() < 0.5:
        video = video.flip(-1)
    return normalize_video(video)


def eval_clip(data: bytes, size: int, num_frames: int, num_crops: int = 1, num_clips: int = 1,
              stride: float = STRIDE) -> torch.Tensor:
    """Decode the deterministic test views of one video.

    Args:
        data: the video file's bytes.
        size: output side ``S``.
        num_frames: frames per view, ``T``.
        num_crops: spatial crops per clip, 1 (centre) or 3 (start, centre, end of the long side).
        num_clips: temporal views.
        stride: source frames between sampled frames at 30 fps.

    Returns:
        Float tensor ``(num_clips * num_crops, T, 3, S, S)``, row ``clip * num_crops + crop``.

    Raises:
        Skip: on an empty or undecodable video.
    """
    reader = _open(data)
    clips = eval_indices(len(reader), stride, reader.get_avg_fps(), num_frames, num_clips)
    frames = _frames(reader, [i for clip in clips for i in clip])  # (clips * T, H, W, 3)
    return video_views(frames.view(num_clips, num_frames, *frames.shape[1:]), size, num_crops)

