"""Image transforms for training and evaluation, per task, as the reference used them.

- Classification, training: timm ``create_transform`` with the reference's ImageNet settings
  (``imagenet.py: build_transform``): RandomResizedCrop, flip, RandAugment ``rand-m9-mstd0.5-inc1``, colour
  jitter 0.4, bicubic, RandomErasing 0.25 (pixel mode, one box), ImageNet mean/std.
- Caption and retrieval, training: the reference's ``clip_transforms('train')``: resize the shorter side to
  ``S`` (bicubic), a random ``S`` x ``S`` crop, horizontal flip with p 0.5, ImageNet mean/std. No RandAugment,
  colour jitter or random erasing; the crop keeps the whole short side, so a caption's objects stay in view.
- VQA, training: the same without the flip, which the loader does with the question's "left" and "right".
- Evaluation: :func:`uniperceiver_cli.model.preprocess.image_transform` (the parity-tested eval transform).

The loader's transforms (:func:`build_image_transform`) map a PIL RGB image to uint8 pixels ``(3, S, S)``,
normalised on the device. Classification training's random erasing fills its box with noise in the normalised
space, so it is split: the box is drawn here (:func:`erasing_box`, the draws of timm's ``RandomErasing``), the
noise on the device (:func:`~uniperceiver_cli.data.loader.visual_input`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from torchvision import transforms

from uniperceiver_cli.model.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from uniperceiver_cli.model.preprocess import image_transform
from uniperceiver_cli.task_types import TASKS, task_names

ImageTransform = Callable[[Image.Image], torch.Tensor]
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
ERASE_PROBABILITY = 0.25
ERASE_AREA = (0.02, 1 / 3)  # timm RandomErasing's defaults: share of the image, aspect ratio 0.3 to 1 / 0.3
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
ERASE_ATTEMPTS = 10


class _AtLeastOneBit:
    """timm's posterize level mapping, clamped so that at least one bit per channel is kept.

    Why: ``PosterizeIncreasing`` keeps ``4 - int(magnitude / 10 * 4)`` bits. With ``mstd0.5`` the magnitude is
    drawn from N(9, 0.5) and clipped to [0, 10], so about 2% of the draws reach 10 and ask for 0 bits. Old
    Pillow turned that into an all-black image; Pillow 13's ``ImageOps.posterize`` rejects it ("bits must be
    between or equal to 1 and 8") and the whole sample fails. Clamping to 1 bit keeps every other draw exactly
    as timm does and replaces the degenerate black image by the strongest valid posterize.
    """

    def __init__(self, level_fn: Callable[[float, dict[str, Any]], tuple[int]]) -> None:
        self.level_fn = level_fn

    def __call__(self, level: float, hparams: dict[str, Any]) -> tuple[int]:
        (bits,) = self.level_fn(level, hparams)
        return (max(1, bits),)


def _clamp_posterize(transform: transforms.Compose) -> transforms.Compose:
    """Give every posterize op of the RandAugment inside ``transform`` a level of at least one bit."""
    for step in transform.transforms:
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name.startswith("Posterize"):
                    op.level_fn = _AtLeastOneBit(op.level_fn)
    return transform


def classification_train_transform(size: int) -> ImageTransform:
    """The reference's ImageNet training transform, safe under Pillow 13 (see :class:`_AtLeastOneBit`)."""
    transform = create_transform(size, is_training=True, auto_augment=RAND_AUGMENT, color_jitter=0.4,
                                 interpolation="bicubic", re_prob=ERASE_PROBABILITY, re_mode="pixel", re_count=1,
                                 mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return _clamp_posterize(transform)


def caption_train_transform(size: int, flip: bool = True) -> ImageTransform:
    """The reference's ``clip_transforms`` training transform for captioning and retrieval; without ``flip`` (VQA,
    whose loader flips an image together with its question's "left" and "right") no horizontal flip."""
    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomCrop(size),
        *([transforms.RandomHorizontalFlip(0.5)] if flip else []),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def build_image_transform(task: str, size: int, *, train: bool) -> ImageTransform:
    """The training (random) or evaluation (deterministic) transform of an image task type for the loader: a PIL
    RGB image -> uint8 ``(3, S, S)``, ``S`` = ``size`` (for evaluation a multiple of the patch size, 16), normalised
    on the device (:func:`~uniperceiver_cli.data.loader.visual_input`). Classification training's random erasing
    is left out: its box comes from :func:`erasing_box`."""
    if task not in task_names("image"):
        raise ValueError(f"task {task!r} has no image input; choose one of: {', '.join(task_names('image'))}")
    kind = TASKS[task].family
    if not train:
        return _as_uint8(image_transform(ModelConfig(image_size=size), kind))
    if kind == "classification":
        return _as_uint8(transforms.Compose(classification_train_transform(size).transforms[:-1]))  # no erasing
    return _as_uint8(caption_train_transform(size, flip=kind != "vqa"))


def erasing_box(size: int) -> tuple[int, int, int, int]:
    """The box (top, left, height, width) timm's ``RandomErasing`` (probability 0.25, pixel mode, one box) would
    erase in an ``S`` x ``S`` image, drawn from Python's global ``random`` with timm's draws in timm's order, so
    the same box it draws after the same transform; (0, 0, 0, 0) for none."""
    if random.random() > ERASE_PROBABILITY:
        return 0, 0, 0, 0
    for _ in range(ERASE_ATTEMPTS):
        area = random.uniform(*ERASE_AREA) * size * size
        aspect = math.exp(random.uniform(*ERASE_LOG_ASPECT))
        height, width = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if width < size and height < size:
            return random.randint(0, size - height), random.randint(0, size - width), height, width
    return 0, 0, 0, 0


def _as_uint8(transform: transforms.Compose) -> transforms.Compose:
    """``transform`` with its closing ToTensor and Normalize left to the device: uint8 pixels, 4x fewer bytes to
    move, normalised there to the same float32 values."""
    *steps, to_tensor, normalize = transform.transforms
    if not (isinstance(to_tensor, transforms.ToTensor) and isinstance(normalize, transforms.Normalize)):
        raise TypeError("the transform does not end with ToTensor and Normalize")
    return transforms.Compose([*steps, transforms.PILToTensor()])
