"""Evaluation preprocessing of images and videos, as the reference did it.

The outputs reproduce the reference parity fixtures' pixel inputs bit-exactly:

- images: PIL RGB and torchvision (v1) transforms with ImageNet mean/std. Classification (ImageNet eval)
  resizes the shorter side to ``int(256 / 224 * S)`` before the centre crop; caption and retrieval (COCO
  ``clip_transforms``) resize it straight to ``S``.
- videos: the TimeSformer/SlowFast test transform. Frames are scaled to 0..1, the short side is resized to
  ``S`` with bilinear ``F.interpolate`` (long side ``floor(L / short * S)``), and ``num_crops`` square crops
  are taken along the long axis, normalised with mean/std 0.5.

``S`` is ``ModelConfig.image_size``. ``model/pixels.py`` computes the same pixels in numpy, without torch, and
holds the size and crop rules both use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from uniperceiver_cli.model.config import IMAGENET_MEAN, IMAGENET_STD, VIDEO_MEAN, VIDEO_STD, ModelConfig
from uniperceiver_cli.model.pixels import (
    IMAGE_TASKS,
    VIDEO_NUM_CROPS,
    crop_indices,
    crop_offsets,
    image_resize_side,
    load_image,
    short_side_shape,
)

__all__ = [
    "IMAGE_TASKS", "VIDEO_NUM_CROPS", "image_transform", "load_image", "normalize_video", "short_side_resize",
    "video_transform", "video_views",
]


def image_transform(config: ModelConfig, task: str = "classification") -> Callable[[Image.Image], torch.Tensor]:
    """The reference's eval transform of one RGB image, ``S`` = ``config.image_size``: the shorter side resized to
    ``int(256 / 224 * S)`` (``task`` "classification") or ``S`` ("caption", "retrieval"), then the centre ``S`` x ``S``
    crop. A PIL RGB image -> float tensor ``[3, S, S]`` normalised with ImageNet mean/std.

    Raises:
        ValueError: if ``task`` is not one of the valid choices.
    """
    size = config.image_size
    return transforms.Compose([
        transforms.Resize(image_resize_side(size, task), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def short_side_resize(video: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[T, 3, H, W]`` so that the short side is ``size`` (SlowFast ``short_side_scale``)."""
    height, width = video.shape[-2:]
    new_height, new_width = short_side_shape(height, width, size)
    if (new_height, new_width) == (height, width):
        return video
    return F.interpolate(video, size=(new_height, new_width), mode="bilinear", align_corners=False)


def _uniform_crop(video: torch.Tensor, size: int, index: int) -> torch.Tensor:
    """Square crop ``index`` (0 start, 1 centre, 2 end) along the long axis of ``[T, 3, H, W]``."""
    y_offset, x_offset = crop_offsets(*video.shape[-2:], size, index)
    return video[..., y_offset : y_offset + size, x_offset : x_offset + size]


def normalize_video(video: torch.Tensor) -> torch.Tensor:
    """Normalise 0..1 video pixels ``[..., 3, H, W]`` with the video mean/std (0.5 / 0.5)."""
    mean = torch.tensor(VIDEO_MEAN, dtype=video.dtype).view(3, 1, 1)
    std = torch.tensor(VIDEO_STD, dtype=video.dtype).view(3, 1, 1)
    return (video - mean) / std


def video_views(frames: torch.Tensor, size: int, num_crops: int = 3) -> torch.Tensor:
    """The reference's test-time spatial views of uint8 RGB frames ``[T, H, W, 3]`` (one video) or
    ``[N, T, H, W, 3]``: the short side resized to ``size`` ``S``, then ``num_crops`` square crops, 3 (start, centre
    and end of the long axis) or 1 (the centre). Returns a float tensor ``[N * num_crops, T, 3, S, S]``, row
    ``video * num_crops + view``, normalised with mean/std 0.5.

    Raises:
        ValueError: on a wrong dtype or shape, or an unsupported ``num_crops``.
    """
    return torch.stack([normalize_video(view) for view in _views(frames, size, num_crops)])


def video_views_uint8(frames: torch.Tensor, size: int, num_crops: int = 3) -> torch.Tensor:
    """:func:`video_views` before normalisation, as uint8 (a quarter of the bytes, for a loader to send): the
    resized pixels rounded to the nearest level, so exactly the frames' own pixels where the short side already is
    ``size``."""
    return torch.stack([to_uint8(view) for view in _views(frames, size, num_crops)])


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """0..1 pixels (a bilinear resize of uint8 / 255) as uint8, each rounded to the nearest level."""
    return video.mul(255).round_().to(torch.uint8)


def _views(frames: torch.Tensor, size: int, num_crops: int) -> list[torch.Tensor]:
    """:func:`video_views`' crops ``[T, 3, S, S]`` as 0..1 floats, video by video."""
    indices = crop_indices(num_crops)
    if frames.dtype != torch.uint8:
        raise ValueError(f"video frames must be uint8, got {frames.dtype}")
    if frames.dim() == 4:
        frames = frames.unsqueeze(0)
    if frames.dim() != 5 or frames.shape[-1] != 3:
        raise ValueError(f"video frames must be [T, H, W, 3] or [N, T, H, W, 3], got {list(frames.shape)}")
    views = []
    for video in frames:
        video = video.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)  # ToTensor per frame
        video = short_side_resize(video, size)
        views.extend(_uniform_crop(video, size, index) for index in indices)
    return views


def video_transform(config: ModelConfig, num_crops: int = 3) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`video_views` of uint8 frames at side ``config.image_size``, ``num_crops`` (1 or 3) views per video.

    Raises:
        ValueError: if ``num_crops`` is not 1 or 3.
    """
    crop_indices(num_crops)  # refuse a wrong count here, not at the first video
    return functools.partial(video_views, size=config.image_size, num_crops=num_crops)
