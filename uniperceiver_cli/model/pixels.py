"""Evaluation preprocessing of images and videos in numpy and PIL, for runtimes without torch.

The same pixels as :mod:`uniperceiver_cli.model.preprocess`: ``image_array`` is bit-identical to
``image_transform``, ``video_views`` agrees with the torch version to float32 rounding, and
``read_video_frames`` picks the frames ``torch.linspace(0, total - 1, n).round()`` picks. The integer rules
(output sizes, crop offsets) live here and ``preprocess`` uses them too.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from uniperceiver_cli.model.config import IMAGENET_MEAN, IMAGENET_STD, VIDEO_MEAN, VIDEO_STD

IMAGE_TASKS = ("classification", "caption", "retrieval", "vqa")
VIDEO_NUM_CROPS = (1, 3)


def load_image(path: str | Path) -> Image.Image:
    """Read an image file as PIL RGB.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file cannot be read or decoded.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"cannot read image '{path}': no such file") from None
    except UnidentifiedImageError:
        raise ValueError(f"cannot read image '{path}': not a recognised image format") from None
    except (OSError, ValueError, SyntaxError) as error:
        detail = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        reason = " ".join(detail.split()) or type(error).__name__
        raise ValueError(f"cannot read image '{path}': {reason}") from None


def image_resize_side(size: int, task: str) -> int:
    """The short side an image is resized to before the ``size`` centre crop.

    Raises:
        ValueError: if ``task`` is not one of ``IMAGE_TASKS``.
    """
    if task not in IMAGE_TASKS:
        raise ValueError(f"unknown image task {task!r}; choose one of: {', '.join(IMAGE_TASKS)}")
    return int((256 / 224) * size) if task == "classification" else size


def image_array(image: Image.Image, size: int, task: str = "classification") -> np.ndarray:
    """The eval preprocessing of one image for ``task`` (one of ``IMAGE_TASKS``), bit-identical to
    ``preprocess.image_transform``: a PIL image (converted to RGB first, as ``load_image`` does) -> float32
    ``(3, S, S)``, ``S`` = ``size``, normalised with ImageNet mean/std.

    Raises:
        ValueError: if ``task`` is not one of the valid choices.
    """
    side = image_resize_side(size, task)
    image = image if image.mode == "RGB" else image.convert("RGB")
    # torchvision's Resize(int) on PIL: the short side becomes `side`, the long one int(side * long / short).
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(side * long / short)
    new_size = (side, new_long) if width <= height else (new_long, side)
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    # CenterCrop: the resized sides are at least `size`, so it never pads.
    top = int(round((image.height - size) / 2.0))
    left = int(round((image.width - size) / 2.0))
    pixels = np.asarray(image)[top : top + size, left : left + size]
    # ToTensor then Normalize, all in float32 as torch computes them.
    x = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def short_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """``(H, W)`` after SlowFast's ``short_side_scale`` to ``size``: the long side becomes
    ``floor(long / short * size)``; a frame whose short side already is ``size`` keeps its shape."""
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(math.floor(float(height) / width * size)), size
    return size, int(math.floor(float(width) / height * size))


def crop_offsets(height: int, width: int, size: int, index: int) -> tuple[int, int]:
    """``(y, x)`` of square crop ``index`` (0 start, 1 centre, 2 end) along the long axis."""
    y_offset = int(math.ceil((height - size) / 2))
    x_offset = int(math.ceil((width - size) / 2))
    if height > width:
        y_offset = {0: 0, 1: y_offset, 2: height - size}[index]
    else:
        x_offset = {0: 0, 1: x_offset, 2: width - size}[index]
    return y_offset, x_offset


def crop_indices(num_crops: int) -> list[int]:
    """The crop indices of ``num_crops`` views: the centre for 1, start, centre and end for 3.

    Raises:
        ValueError: if ``num_crops`` is not 1 or 3.
    """
    if num_crops not in VIDEO_NUM_CROPS:
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    return [1] if num_crops == 1 else [0, 1, 2]


def _fused(a: np.floating, b: np.ndarray, c: float) -> np.ndarray:
    """float32 ``a * b + c`` rounded once, like the fused multiply-adds torch's CPU kernels are built with.
    float64 holds the product of float32 ``a`` and a small integer or half-integer ``b`` exactly, and at
    these sizes the sum as well, so only the final rounding to float32 remains."""
    return (np.float64(a) * b + c).astype(np.float32)


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows and weights of torch's linear resize with ``align_corners=False``, in float32 like torch."""
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.maximum(_fused(scale, np.arange(out_size) + 0.5, -0.5), np.float32(0))
    low = np.minimum(source.astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    weight = np.clip(source - low.astype(np.float32), np.float32(0), np.float32(1))
    return low, high, weight


def _bilinear(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize float32 ``(..., H, W, C)`` as ``F.interpolate(mode="bilinear", align_corners=False)``."""
    low, high, weight = _linear_taps(video.shape[-3], height)
    weight = weight[:, None, None]
    video = video[..., low, :, :] * (1 - weight) + video[..., high, :, :] * weight
    low, high, weight = _linear_taps(video.shape[-2], width)
    weight = weight[:, None]
    return video[..., low, :] * (1 - weight) + video[..., high, :] * weight


def video_views(frames: np.ndarray, size: int, num_crops: int = 3) -> np.ndarray:
    """The reference's test-time spatial views of uint8 RGB videos, as ``preprocess.video_views``: frames
    ``(T, H, W, 3)`` or ``(N, T, H, W, 3)`` -> float32 ``(N * num_crops, T, 3, S, S)``, ``S`` = ``size``.

    Raises:
        ValueError: on a wrong dtype or shape, or an unsupported ``num_crops``.
    """
    indices = crop_indices(num_crops)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"video frames must be uint8, got {frames.dtype}")
    if frames.ndim == 4:
        frames = frames[None]
    if frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"video frames must be [T, H, W, 3] or [N, T, H, W, 3], got {list(frames.shape)}")
    height, width = frames.shape[2:4]
    new_height, new_width = short_side_shape(height, width, size)
    video = frames.astype(np.float32) / np.float32(255)  # (N, T, H, W, 3)
    if (new_height, new_width) != (height, width):
        video = _bilinear(video, new_height, new_width)
    mean = np.asarray(VIDEO_MEAN, dtype=np.float32)
    std = np.asarray(VIDEO_STD, dtype=np.float32)
    views = []
    for index in indices:
        y, x = crop_offsets(new_height, new_width, size, index)
        views.append((video[:, :, y : y + size, x : x + size] - mean) / std)
    stacked = np.stack(views, axis=1)  # (N, num_crops, T, S, S, 3)
    return np.ascontiguousarray(stacked.reshape(-1, *stacked.shape[2:]).transpose(0, 1, 4, 2, 3))


def frame_indices(total: int, num_frames: int) -> np.ndarray:
    """``num_frames`` indices spread evenly over ``total`` frames: ``torch.linspace(0, total - 1, num_frames)
    .round()`` as torch's CPU kernel computes it, in float32 from both ends, then rounded half to even."""
    if num_frames == 1:
        return np.zeros(1, dtype=np.int64)
    end = np.float32(total - 1)
    step = end / np.float32(num_frames - 1)
    steps = np.arange(num_frames)
    from_start = _fused(step, steps, 0.0)
    from_end = _fused(-step, num_frames - 1 - steps, end)
    return np.round(np.where(steps < num_frames // 2, from_start, from_end)).astype(np.int64)


def read_video_frames(path: str | Path, num_frames: int) -> np.ndarray:
    """``num_frames`` frames spread evenly over the whole clip, uint8 ``(T, H, W, 3)``.

    Raises:
        ValueError: if the file cannot be decoded or has no frames.
    """
    import decord

    try:
        reader = decord.VideoReader(str(path))
        total = len(reader)
        if total == 0:
            raise ValueError("the video has no frames")
        return reader.get_batch(frame_indices(total, num_frames).tolist()).asnumpy()
    except Exception as e:  # noqa: BLE001 - decord raises its own error types for bad files
        raise ValueError(f"cannot read video '{path}': {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from e
