from pathlib import Path

import pytest
import torch

from uniperceiver_cli.model.config import ModelConfig
from uniperceiver_cli.model.preprocess import (
    image_transform,
    load_image,
    video_transform,
    video_views,
)


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return ModelConfig(image_size=224)


@pytest.mark.parametrize(
    ("computation", "task"),
    [("image_cls", "classification"), ("caption", "caption"), ("retrieval", "retrieval")],
)
def test_images_match_fixture(
    reference_dir: Path, ref_io: dict, config: ModelConfig, computation: str, task: str
) -> None:
    sample = ref_io[computation]["inputs"]["input_sample_list"][0]
    transform = image_transform(config, task)
    batch = torch.stack(
        [transform(load_image(reference_dir / "raw" / info["path"])) for info in sample["sample_info"]]
    )
    assert batch.dtype == torch.float32
    assert torch.equal(batch, sample["data"])


def test_video_matches_fixture(ref_io: dict, config: ModelConfig, default_threads: None) -> None:
    inputs = ref_io["video_cls"]["inputs"]
    frames = inputs["raw_frames_uint8"]  # [1, 4, 240, 320, 3]
    expected = inputs["input_sample_list"][0]["data"]  # [3, 4, 3, 224, 224]
    assert torch.equal(video_views(frames, 224), expected)
    assert torch.equal(video_transform(config)(frames[0]), expected)  # single video [T, H, W, 3]


def test_video_batch_rows_are_video_major(ref_io: dict) -> None:
    frames = ref_io["video_cls"]["inputs"]["raw_frames_uint8"]
    two = torch.cat([frames, frames.flip(-2)])  # second video: mirrored
    views = video_views(two, 224)
    assert views.shape == (6, 4, 3, 224, 224)
    assert torch.equal(views[:3], video_views(frames, 224))
    assert torch.equal(views[3:], video_views(frames.flip(-2), 224))


def test_single_crop_is_centre_view(ref_io: dict, config: ModelConfig) -> None:
    frames = ref_io["video_cls"]["inputs"]["raw_frames_uint8"]
    one = video_transform(config, num_crops=1)(frames)
    assert one.shape == (1, 4, 3, 224, 224)
    assert torch.equal(one[0], video_views(frames, 224)[1])


def test_portrait_video_crops_along_height(ref_io: dict) -> None:
    landscape = ref_io["video_cls"]["inputs"]["raw_frames_uint8"][0]  # [4, 240, 320, 3]
    portrait = landscape.transpose(1, 2).contiguous()  # [4, 320, 240, 3]
    views = video_views(portrait, 224)
    assert views.shape == (3, 4, 3, 224, 224)
    # Short side 240 -> 224 (width), long side 320 -> 298, crops at y = 0, 37, 74:
    # the transposed landscape views.
    expected = video_views(landscape, 224).transpose(-1, -2)
    torch.testing.assert_close(views, expected, rtol=0, atol=1e-6)


def test_video_input_validation() -> None:
    frames = torch.zeros(2, 32, 48, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        video_views(frames.float(), 16)
    with pytest.raises(ValueError, match="num_crops"):
        video_views(frames, 16, num_crops=2)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        video_views(frames[..., :2], 16)


def test_image_size_follows_config(reference_dir: Path) -> None:
    image = load_image(reference_dir / "raw" / "imagenet" / "val" / "img_1.png")  # portrait 256x300
    assert image.mode == "RGB"
    for task in ("classification", "caption"):
        assert image_transform(ModelConfig(image_size=384), task)(image).shape == (3, 384, 384)


def test_missing_image(tmp_path: Path) -> None:
    path = tmp_path / "missing.jpg"
    with pytest.raises(FileNotFoundError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"cannot read image '{path}'")
    assert "\n" not in message


def test_corrupt_image(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    path.write_bytes(b"this is not a jpeg \x00\x01\x02" * 10)
    with pytest.raises(ValueError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"cannot read image '{path}': ")
    assert "\n" not in message


def test_truncated_image(tmp_path: Path, reference_dir: Path) -> None:
    data = (reference_dir / "raw" / "imagenet" / "val" / "img_0.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"^cannot read image '.*cut\.png': \S"):
        load_image(path)


def test_unknown_task(config: ModelConfig) -> None:
    with pytest.raises(ValueError, match="classification, caption, retrieval"):
        image_transform(config, "detection")
