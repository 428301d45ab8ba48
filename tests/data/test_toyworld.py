import hashlib
import io
import json
import tarfile
from pathlib import Path

import decord
import numpy as np
import pytest
from PIL import Image

from uniperceiver_cli.data.shards import Manifest
from uniperceiver_cli.data.toyworld import COLOURS, MOTIONS, SHAPES, SPLIT_COUNTS, generate

SIDE, FRAMES = 64, 8


def _generate(out: Path, **kwargs: object) -> dict[str, Manifest]:
    settings = {"size": "tiny", "image_size": SIDE, "num_frames": FRAMES, "progress": False} | kwargs
    return generate(out, **settings)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Manifest]]:
    out = tmp_path_factory.mktemp("toyworld")
    return out, _generate(out)


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _samples(directory: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a split: key -> {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(directory.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _mask(frame: np.ndarray, colour: str) -> np.ndarray:
    """Pixels close to the object's colour."""
    return np.abs(frame.astype(int) - np.array(COLOURS[colour])).sum(-1) < 90


def test_same_seed_gives_identical_files_for_any_worker_count(world, tmp_path: Path) -> None:
    out, _ = world
    _generate(tmp_path / "again", workers=2)
    assert _checksums(tmp_path / "again") == _checksums(out)
    _generate(tmp_path / "other", seed=1)
    other, first = _checksums(tmp_path / "other"), _checksums(out)
    tars = [name for name in first if name.endswith(".tar")]
    assert len(tars) == 32 and all(other[name] != first[name] for name in tars)


def test_manifests_and_summary(world) -> None:
    out, manifests = world
    assert manifests.keys() == SPLIT_COUNTS["tiny"].keys()
    for name, manifest in manifests.items():
        assert manifest.num_samples == SPLIT_COUNTS["tiny"][name] and not manifest.skipped
        assert Manifest.load(out / name).num_samples == manifest.num_samples
        assert len(manifest.shards) == 4
    images, videos, text = manifests["images/test"], manifests["videos/val"], manifests["text/train"]
    assert (images.modality, images.classes) == ("image", list(SHAPES))
    assert images.tasks == ["image_classification", "image_caption", "image_retrieval"]
    assert images.extra["label_sets"] == {"shape": list(SHAPES), "colour": list(COLOURS)}
    assert (videos.modality, videos.classes, videos.extra["label_sets"]) == ("video", list(MOTIONS),
                                                                            {"motion": list(MOTIONS)})
    assert videos.tasks == ["video_classification", "video_caption", "video_retrieval"]
    assert (text.modality, text.tasks) == ("text", ["text_mlm"])

    summary = json.loads((out / "toyworld.json").read_text())
    assert (summary["seed"], summary["size"], summary["image_size"], summary["num_frames"]) == (0, "tiny", SIDE, FRAMES)
    assert summary["label_sets"]["colour"] == list(COLOURS)
    training = {t["name"]: (t["task"], t["data"], t["label_set"]) for t in summary["training_tasks"]}
    zero_shot = {t["name"]: (t["task"], t["data"], t["label_set"]) for t in summary["zero_shot_tasks"]}
    assert training == {"shape_classification": ("image_classification", "images", "shape"),
                        "image_captioning": ("image_caption", "images", None),
                        "image_text_retrieval": ("image_retrieval", "images", None),
                        "mlm": ("text_mlm", "text", None),
                        "motion_classification": ("video_classification", "videos", "motion")}
    assert zero_shot == {"colour_classification": ("image_classification", "images", "colour"),
                         "video_captioning": ("video_caption", "videos", None),
                         "video_text_retrieval": ("video_retrieval", "videos", None)}


def test_images_decode_and_captions_name_the_main_object(world) -> None:
    out, _ = world
    samples = _samples(out / "images" / "test")
    assert len(samples) == SPLIT_COUNTS["tiny"]["images/test"]
    for key, sample in samples.items():
        assert sample.keys() == {"png", "txt", "cls", "json"}
        meta = json.loads(sample["json"])
        image = Image.open(io.BytesIO(sample["png"]))
        assert (image.mode, image.size) == ("RGB", (SIDE, SIDE))
        assert meta["id"] == key and int(sample["cls"]) == meta["labels"]["shape"] == SHAPES.index(meta["shape"])
        assert meta["labels"]["colour"] == list(COLOURS).index(meta["colour"])
        assert 2 <= len(meta["captions"]) <= 5 and sample["txt"].decode() == meta["captions"][0]
        assert all(meta["shape"] in c and meta["colour"] in c for c in meta["captions"])
        close = np.abs(np.asarray(image, int) - np.array(COLOURS[meta["colour"]])).max(-1) < 16
        assert close.sum() >= 20, f"{key}: no {meta['colour']} object visible"


def test_videos_decode_and_show_the_motion(world) -> None:
    out, _ = world
    seen = set()
    for split in ("train", "val", "test"):
        for key, sample in _samples(out / "videos" / split).items():
            meta = json.loads(sample["json"])
            frames = decord.VideoReader(io.BytesIO(sample["mp4"])).get_batch(list(range(FRAMES))).asnumpy()
            assert frames.shape == (FRAMES, SIDE, SIDE, 3)
            assert int(sample["cls"]) == MOTIONS.index(meta["motion"]) == meta["labels"]["motion"]
            assert 2 <= len(meta["captions"]) <= 4 and sample["txt"].decode() == meta["captions"][0]
            assert all(meta["shape"] in c and meta["colour"] in c for c in meta["captions"])
            masks = [_mask(frame, meta["colour"]) for frame in frames]
            area = np.array([m.sum() for m in masks])
            ys, xs = zip(*(np.argwhere(m).mean(0) for m in masks), strict=True)
            dx, dy, growth = (xs[-1] - xs[0]) / SIDE, (ys[-1] - ys[0]) / SIDE, area[-1] / area[0]
            overlap = min((masks[0] & m).sum() / (masks[0] | m).sum() for m in masks)  # IoU with the first frame
            expected = {
                "moving left": dx < -0.3, "moving right": dx > 0.3, "moving up": dy < -0.3, "moving down": dy > 0.3,
                "growing": growth > 3, "shrinking": growth < 1 / 3,
                "rotating": 0.7 < growth < 1.4 and overlap < 0.8,
            }
            assert expected[meta["motion"]], f"{key}: {meta['motion']} not visible (dx {dx}, dy {dy}, growth {growth})"
            seen.add(meta["motion"])
    assert seen == set(MOTIONS)


def test_text_passages(world) -> None:
    out, _ = world
    samples = _samples(out / "text" / "train")
    assert len(samples) == SPLIT_COUNTS["tiny"]["text/train"]
    for sample in samples.values():
        assert sample.keys() == {"txt"}
        text = sample["txt"].decode()
        assert 2 <= text.count(".") <= 6 and text.endswith(".")
        assert any(shape in text for shape in SHAPES)


def test_resume_rewrites_only_the_missing_shard(tmp_path: Path) -> None:
    _generate(tmp_path)
    before = _checksums(tmp_path)
    shards = sorted((tmp_path / "images" / "train").glob("shard-*.tar"))
    mtimes = {p: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()
    _generate(tmp_path)
    assert _checksums(tmp_path) == before
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in shards if p != shards[1])


def test_rejects_other_settings_and_bad_arguments(world) -> None:
    out, _ = world
    with pytest.raises(ValueError, match="other settings"):
        _generate(out, seed=1)
    with pytest.raises(ValueError, match="size"):
        _generate(out, size="huge")
    with pytest.raises(ValueError, match="image_size"):
        _generate(out, image_size=33)
