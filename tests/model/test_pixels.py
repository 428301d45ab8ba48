"""The torch-free preprocessing (model/pixels.py) gives the pixels of the torch one (model/preprocess.py)."""

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from uniperceiver_cli.model import pixels
from uniperceiver_cli.model.config import ModelConfig
from uniperceiver_cli.model.preprocess import image_transform, load_image, video_views
from uniperceiver_cli.model.tokenizer import Tokenizer

TASKS = [("image_cls", "classification"), ("caption", "caption"), ("retrieval", "retrieval")]


def _torch_image(image: Image.Image, size: int, task: str) -> np.ndarray:
    return image_transform(ModelConfig(image_size=size), task)(image).numpy()


@pytest.mark.parametrize(("computation", "task"), TASKS)
def test_image_array_matches_fixture_images(reference_dir: Path, ref_io: dict, computation: str, task: str) -> None:
    sample = ref_io[computation]["inputs"]["input_sample_list"][0]
    for info, expected in zip(sample["sample_info"], sample["data"], strict=True):
        image = load_image(reference_dir / "raw" / info["path"])
        array = pixels.image_array(image, 224, task)
        assert array.dtype == np.float32 and array.shape == (3, 224, 224)
        np.testing.assert_array_equal(array, _torch_image(image, 224, task))
        np.testing.assert_array_equal(array, expected.numpy())


@pytest.mark.parametrize("task", [task for _, task in TASKS])
@pytest.mark.parametrize(
    ("width", "height"),
    [(301, 200), (150, 331), (1, 1), (3, 2), (500, 7), (224, 224), (256, 256), (257, 255)],
    ids=["landscape", "portrait", "one-pixel", "tiny", "strip", "S-square", "resize-square", "near-square"],
)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_image_array_is_bit_identical_to_image_transform(width: int, height: int, mode: str, task: str) -> None:
    rng = np.random.default_rng(width * 1000 + height)
    data = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray({"RGB": data[..., :3], "RGBA": data, "L": data[..., 0]}[mode])
    assert image.mode == mode
    for size in (224, 32):
        array = pixels.image_array(image, size, task)
        assert array.dtype == np.float32 and array.shape == (3, size, size)
        # Other modes are compared with the reference path: load_image converts to RGB before the transform.
        np.testing.assert_array_equal(array, _torch_image(image.convert("RGB"), size, task))


def test_image_array_unknown_task() -> None:
    with pytest.raises(ValueError, match="classification, caption, retrieval"):
        pixels.image_array(Image.new("RGB", (8, 8)), 8, "detection")


@pytest.mark.parametrize("num_crops", [1, 3])
@pytest.mark.parametrize(
    ("shape", "size"),
    [((3, 48, 64, 3), 32), ((3, 64, 48, 3), 32), ((2, 20, 30, 3), 32), ((2, 30, 20, 3), 32),
     ((2, 3, 40, 56, 3), 24), ((2, 32, 45, 3), 32), ((4, 240, 320, 3), 224)],
    ids=["landscape-down", "portrait-down", "landscape-up", "portrait-up", "batch", "short-side-is-S", "fixture-size"],
)
def test_video_views_match_torch(shape: tuple[int, ...], size: int, num_crops: int) -> None:
    frames = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    views = pixels.video_views(frames, size, num_crops)
    expected = video_views(torch.from_numpy(frames), size, num_crops).numpy()
    assert views.dtype == np.float32 and views.shape == expected.shape
    np.testing.assert_allclose(views, expected, rtol=0, atol=1e-5)


def test_video_views_match_fixture(ref_io: dict) -> None:
    inputs = ref_io["video_cls"]["inputs"]
    views = pixels.video_views(inputs["raw_frames_uint8"].numpy(), 224)
    np.testing.assert_allclose(views, inputs["input_sample_list"][0]["data"].numpy(), rtol=0, atol=1e-5)


def test_video_views_input_validation() -> None:
    frames = np.zeros((2, 32, 48, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        pixels.video_views(frames.astype(np.float32), 16)
    with pytest.raises(ValueError, match="num_crops"):
        pixels.video_views(frames, 16, num_crops=2)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        pixels.video_views(frames[..., :2], 16)


@pytest.mark.parametrize(
    ("total", "num_frames"),
    # Not the long clips where torch's float32 rounding depends on the CPU's fused multiply-add.
    [(1, 1), (1, 8), (5, 8), (8, 8), (10, 3), (100, 8), (301, 16), (1000, 32), (12345, 64)],
)
def test_frame_indices_follow_torch_linspace(total: int, num_frames: int) -> None:
    expected = torch.linspace(0, total - 1, num_frames).round().long().numpy()
    np.testing.assert_array_equal(pixels.frame_indices(total, num_frames), expected)


def _grey_mp4(path: Path, frames: int, size: int = 64) -> None:  # decord mis-decodes widths below 64
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            image = np.full((size, size, 3), 10 * t + 20, dtype=np.uint8)  # the frame number, as brightness
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def test_read_video_frames_picks_the_torch_frames(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    _grey_mp4(path, frames=20)
    frames = pixels.read_video_frames(path, 6)
    assert frames.dtype == np.uint8 and frames.shape == (6, 64, 64, 3)
    index = torch.linspace(0, 19, 6).round().long().numpy()
    np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)), 10 * index + 20, atol=3)


def test_read_video_frames_refuses_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"not a video")
    with pytest.raises(ValueError, match=r"^cannot read video '.*broken\.mp4': "):
        pixels.read_video_frames(path, 4)


_NO_TORCH = """
import json, sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np
from uniperceiver_cli.model.pixels import image_array, load_image, video_views
from uniperceiver_cli.model.tokenizer import Tokenizer, bpe_path

path = bpe_path()
sys.modules["open_clip"] = None  # a tokenizer given its merges file never looks for open_clip
tokenizer = Tokenizer(path)
ids = tokenizer.encode(sys.argv[1])
np.save(sys.argv[3], image_array(load_image(sys.argv[2]), 224, "caption"))
views = video_views(np.zeros((2, 48, 64, 3), dtype=np.uint8), 32)
print(json.dumps({"ids": ids, "text": tokenizer.decode(ids), "array_text": tokenizer.decode(np.array(ids)),
                  "views": list(views.shape)}))
"""


def test_tokenizer_and_pixels_work_without_torch(tmp_path: Path, reference_dir: Path) -> None:
    text, image = "A photo of a Golden Retriever!", reference_dir / "raw" / "coco" / "images" / "val2014" / "img_0.png"
    result = subprocess.run([sys.executable, "-c", _NO_TORCH, text, str(image), str(tmp_path / "image.npy")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    tokenizer = Tokenizer()
    assert answer["ids"] == tokenizer.encode(text)
    assert answer["text"] == answer["array_text"] == tokenizer.decode(tokenizer.encode(text))
    assert answer["views"] == [3, 2, 3, 32, 32]
    np.testing.assert_array_equal(np.load(tmp_path / "image.npy"), _torch_image(load_image(image), 224, "caption"))
