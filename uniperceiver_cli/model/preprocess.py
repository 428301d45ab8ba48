"""Evaluation preprocessing of images and videos, as the reference did it.

The outputs reproduce the reference parity fixtures' pixel inputs bit-exactly:

- images: PIL RGB and torchvision (v1) transforms with ImageNet mean/std. Classification (ImageNet eval)
  resizes the shorter side to ``int(256 / 224 * S)`` before the centre crop; caption and retrieval (COCO
  ``clip_transforms``) resize it straight to ``S``.
- videos: the TimeSformer/SlowFast test transform. Frames are scaled to 0..1, the short side is resized to
  ``S`` with bilinear ``F.interpolate`` (long side ``floor(L / short * S)``), and ``num_crops`` square crops
  are taken along the long axis, normalised with mean/std 0.5.

``S`` is ``ModelConfig.image_size``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

from uniperceiver_cli.model.config import IMAGENET_MEAN, IMAGENET_STD, VIDEO_MEAN, VIDEO_STD, ModelConfig

IMAGE_TASKS = ("classification", "caption", "retrieval")
VIDEO_NUM_CROPS = (1, 3)


def image_transform(
    config: ModelConfig, task: str = "classification"
) -> Callable[[Image.Image], torch.Tensor]:
    """The reference's eval transform of one RGB image for a task.

    Args:
        config: model config; ``config.image_size`` is the output side ``S``.
        task: ``"classification"`` (ImageNet eval: resize the shorter side to ``int(256 / 224 * S)``) or
            ``"caption"`` / ``"retrieval"`` (COCO eval: resize the shorter side to ``S``). Both then
            centre-crop ``S`` x ``S``.

    Returns:
        A callable mapping a PIL RGB image to a float tensor ``[3, S, S]`` normalised with ImageNet mean/std.

    Raises:
        ValueError: if ``task`` is not one of the valid choices.
    """
    if task not in IMAGE_TASKS:
        raise ValueError(f"unknown image task {task!r}; choose one of: {', '.join(IMAGE_TASKS)}")
    size = config.image_size
    resize = int((256 / 224) * size) if task == "classification" else size
    return transforms.Compose(
        [
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def load_image(path: str | Path) -> Image.Image:
    """Read an image file as PIL RGB.

    Args:
        path: the image file.

    Returns:
        The decoded image, converted to RGB.

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


def short_side_resize(video: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[T, 3, H, W]`` so that the short side is ``size`` (SlowFast ``short_side_scale``)."""
    height, width = video.shape[-2:]
    if (width <= height and width == size) or (height <= width and height == size):
        return video
    if width < height:
        new_height, new_width = int(math.floor(float(height) / width * size)), size
    else:
        new_height, new_width = size, int(math.floor(float(width) / height * size))
    return F.interpolate(video, size=(new_height, new_width), mode="bilinear", align_corners=False)


def _uniform_crop(video: torch.Tensor, size: int, index: int) -> torch.Tensor:
    """Square crop ``index`` (0 start, 1 centre, 2 end) along the long axis of ``[T, 3, H, W]``."""
    height, width = video.shape[-2:]
    y_offset = int(math.ceil((height - size) / 2))
    x_offset = int(math.ceil((width - size) / 2))
    if height > width:
        y_offset = {0: 0, 1: y_offset, 2: height - size}[index]
    else:
        x_offset = {0: 0, 1: x_offset, 2: width - size}[index]
    return video[..., y_offset : y_offset + size, x_offset : x_offset + size]


def normalize_video(video: torch.Tensor) -> torch.Tensor:
    """Normalise 0..1 video pixels ``[..., 3, H, W]`` with the video mean/std (0.5 / 0.5)."""
    mean = torch.tensor(VIDEO_MEAN, dtype=video.dtype).view(3, 1, 1)
    std = torch.tensor(VIDEO_STD, dtype=video.dtype).view(3, 1, 1)
    return (video - mean) / std


def video_views(frames: torch.Tensor, size: int, num_crops: int = 3) -> torch.Tensor:
    """The reference's test-time spatial views of uint8 RGB videos.

    Args:
        frames: uint8 frames ``[T, H, W, 3]`` (one video) or ``[N, T, H, W, 3]``.
        size: output side ``S``; the short side is resized to it.
        num_crops: 3 (start, centre and end of the long axis) or 1 (the centre).

    Returns:
        Float tensor ``[N * num_crops, T, 3, S, S]``, row ``video * num_crops + view``, normalised with
        mean/std 0.5.

    Raises:
        ValueError: on a wrong dtype or shape, or an unsupported ``num_crops``.
    """
    if num_crops not in VIDEO_NUM_CROPS:
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"video frames must be uint8, got {frames.dtype}")
    if frames.dim() == 4:
        frames = frames.unsqueeze(0)
    if frames.dim() != 5 or frames.shape[-1] != 3:
        raise ValueError(f"video frames must be [T, H, W, 3] or [N, T, H, W, 3], got {list(frames.shape)}")
    crop_indices = [1] if num_crops == 1 else [0, 1, 2]
    views = []
    for video in frames:
        video = video.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)  # ToTensor per frame
        video = short_side_resize(video, size)
        views.extend(normalize_video(_uniform_crop(video, size, index)) for index in crop_indices)
    return torch.stack(views)


def video_transform(config: ModelConfig, num_crops: int = 3) -> Callable[[torch.Tensor], torch.Tensor]:
    """The video test transform tied to ``config.image_size``.

    Args:
        config: model config; ``config.image_size`` is the output side.
        num_crops: spatial views per video, 1 or 3.

    Returns:
        A callable mapping uint8 frames to views, as :func:`video_views`.

    Raises:
        ValueError: if ``num_crops`` is not 1 or 3.
    """
    if num_crops not in VIDEO_NUM_CROPS:
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")

    def transform(frames: torch.Tensor) -> torch.Tensor:
        return video_views(frames, config.image_size, num_crops)

    return transform
