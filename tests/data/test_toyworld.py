import hashlib
import io
import json
import tarfile
from pathlib import Path

import decord
import numpy as np
import pytest
from PIL import Image

from uniperceiver_cli.data.shards import Manifest, read_metas
from uniperceiver_cli.data.toyworld import (
    COLOURS,
    MOTIONS,
    SHAPES,
    SINGLE_TEMPLATES,
    SPLIT_COUNTS,
    VQA_ANSWERS,
    generate,
    strict_recall_ceiling,
    true_caption_recall,
    true_captions,
)

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
    assert len(tars) == 48 and all(other[name] != first[name] for name in tars)  # 12 splits of 4 shards


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
                         "video_text_retrieval": ("video_retrieval", "videos", None),
                         "vqa": ("vqa", "questions", None)}


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


def test_questions_are_answered_by_their_scene(world) -> None:
    out, manifests = world
    assert manifests["questions/train"].classes == VQA_ANSWERS and manifests["questions/train"].tasks == ["vqa"]
    samples = _samples(out / "questions" / "train")
    assert len(samples) == SPLIT_COUNTS["tiny"]["questions/train"]
    kinds = []
    for sample in samples.values():
        meta = json.loads(sample["json"])
        question, answer, objects = sample["txt"].decode(), meta["answers"][0], meta["objects"]
        main = objects[0]
        assert meta["answers"] == [answer] * 10 and meta["targets"] == [[VQA_ANSWERS.index(answer), 1.0]]
        assert Image.open(io.BytesIO(sample["png"])).size == (SIDE, SIDE)
        kind = meta["answer_type"]
        kinds.append(kind)
        if kind == "colour":
            assert question == f"what colour is the {main['shape']}?" and answer == main["colour"]
        elif kind == "shape":
            assert answer == main["shape"] and main["colour"] in question
        elif kind == "count":
            assert answer == str(len(objects))
        elif kind == "position":
            assert answer in ("left", "right", "top", "bottom", "center") and main["shape"] in question
        else:
            asked = question.removeprefix("is there ").removesuffix("?").split()[-2:]
            there = any([o["colour"], o["shape"]] == asked for o in objects)
            assert answer == ("yes" if there else "no")
    assert {k: kinds.count(k) for k in set(kinds)} == {k: 64 // 5 + (i < 64 % 5) for i, k in enumerate(
        ("colour", "shape", "count", "position", "exists"))}
    answers = [json.loads(s["json"])["answers"][0] for s in samples.values()]
    assert {"1", "2", "yes", "no"} <= set(answers)


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


def _image_meta(key: str, first: str, objects: list[tuple[str, str, str]], position: str,
                relation: str | None = None) -> dict:
    return {"id": key, "captions": [first], "position": position, "relation": relation,
            "objects": [{"shape": s, "colour": c, "size": z} for s, c, z in objects]}


def test_read_metas_and_true_captions_hold_every_written_caption(world) -> None:
    out, _ = world
    for split in ("images/test", "videos/test"):
        metas = read_metas(out / split)
        assert sorted(metas) == sorted(_samples(out / split))
        for meta in metas.values():  # a sample's own captions are true of it, and all name its shape and colour
            truth = true_captions(meta)
            assert set(meta["captions"]) <= truth
            assert all(meta["shape"] in c and meta["colour"] in c for c in truth)


def test_true_captions_by_hand() -> None:
    single = _image_meta("a", "a picture of a small red circle", [("circle", "red", "small")], "left")
    assert "a red circle on the left" in true_captions(single)  # the plain template: true at either size
    assert "a small red circle on the right" not in true_captions(single)
    assert len(true_captions(single)) == len(SINGLE_TEMPLATES)
    pair = _image_meta("b", "x", [("star", "blue", "large"), ("cross", "white", "small")], "left", "to the left of")
    assert "a small white cross to the right of a large blue star" in true_captions(pair)
    assert "a large blue star to the right of a small white cross" not in true_captions(pair)
    clip = {"motion": "moving left", "shape": "heart", "colour": "green", "size": "large", "captions": []}
    assert true_captions(clip) == {
        "a green heart moving to the left", "a large green heart moving to the left",
        "the green heart is moving to the left", "a video of a green heart moving to the left",
        "a large green heart that is moving to the left"}


def test_true_caption_recall_and_the_strict_ceiling_by_hand() -> None:
    # a: its caption is true of it alone; b and c: identical scenes and captions (a tie: never a strict hit);
    # d: a large red circle on the left, of which a's caption "a red circle on the left" is true as well.
    metas = {"a": _image_meta("a", "a red circle on the left", [("circle", "red", "small")], "left"),
             "b": _image_meta("b", "a picture of a large blue star", [("star", "blue", "large")], "top"),
             "c": _image_meta("c", "a picture of a large blue star", [("star", "blue", "large")], "top"),
             "d": _image_meta("d", "the large red circle is on the left", [("circle", "red", "large")], "left")}
    # a: 1 true candidate, its own: 1. b, c: own caption tied: 0. d: 2 true candidates (a's, d's): 1/2.
    assert strict_recall_ceiling(metas) == pytest.approx(100 * (1 + 0 + 0 + 0.5) / 4)
    best = {"a": "a red circle on the left", "b": "a picture of a large blue star",
            "c": "the large red circle is on the left", "d": "a red circle on the left"}
    assert true_caption_recall(best, metas) == 75.0  # c's top caption is d's: false of c
    with pytest.raises(ValueError, match="no retrieval predictions"):
        true_caption_recall({}, metas)
