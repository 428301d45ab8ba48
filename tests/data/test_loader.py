import bz2
import gzip
import io
import json
import lzma
import os
import random
import shutil
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment

from uniperceiver_cli.data.loader import SampleDecoder, ShardLoader, choose_subset, make_loader, visual_input
from uniperceiver_cli.data.mixing import mix_tasks
from uniperceiver_cli.data.shards import Manifest, Sample, Skip, write_shards
from uniperceiver_cli.data.transforms import (
    build_image_transform,
    caption_train_transform,
    classification_train_transform,
    erasing_box,
)
from uniperceiver_cli.data.video import eval_clip, eval_indices, train_clip, train_indices
from uniperceiver_cli.model.config import ModelConfig
from uniperceiver_cli.model.preprocess import image_transform, video_views, video_views_uint8
from uniperceiver_cli.model.tokenizer import get_tokenizer
from uniperceiver_cli.random_state import global_rng_state, set_global_rng_state
from uniperceiver_cli.task_types import TASKS

SIZE, FRAMES = 32, 4
NUM_IMAGES, NUM_VIDEOS, NUM_TEXTS = 24, 8, 8
# decord cannot copy out frames of some tiny widths (16, 24, 48, 72 px); 64 x 32 decodes.
VIDEO_W, VIDEO_H = 64, 32


def _image_bytes(seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(out, format=fmt)
    return out.getvalue()


def _video_bytes(seed: int, frames: int = 6) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = VIDEO_W, VIDEO_H, "yuv420p"
        for _ in range(frames):
            pixels = rng.integers(0, 256, (VIDEO_H, VIDEO_W, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return out.getvalue()


def _captions(i: int) -> list[str]:
    return [f"a photo of thing number {i}", f"thing {i} seen from the side"]


def _meta(i: int) -> dict:
    return {"id": f"s{i:03d}", "captions": _captions(i), "labels": {"colour": i % 2}}


def _write(directory: Path, samples: list[Sample], modality: str) -> Path:
    manifest = Manifest(dataset="test", split="train", modality=modality, tasks=[], source="test")
    write_shards(directory, samples, lambda sample: sample, manifest=manifest, min_shards=4, progress=False)
    return directory


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    samples = [Sample(f"s{i:03d}", image=_image_bytes(i, "PNG" if i % 2 else "JPEG"),
                      image_ext="png" if i % 2 else "jpg", label=i % 3, meta=_meta(i)) for i in range(NUM_IMAGES)]
    return _write(tmp_path_factory.mktemp("images"), samples, "image")


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    samples = [Sample(f"s{i:03d}", video=_video_bytes(i), label=i % 3, meta=_meta(i)) for i in range(NUM_VIDEOS)]
    return _write(tmp_path_factory.mktemp("videos"), samples, "video")


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    samples = [Sample(f"s{i:03d}", text=f"passage {i}. " + "words " * (20 * i)) for i in range(NUM_TEXTS)]
    return _write(tmp_path_factory.mktemp("texts"), samples, "text")


def _batches(source: Path, **kwargs) -> list[dict]:
    settings = {"batch_size": 5, "image_size": SIZE, "num_frames": FRAMES} | kwargs
    return list(make_loader(source, **settings))


def _keys(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["keys"]]


def _index(key: str) -> int:
    return int(key[1:])


@pytest.mark.parametrize("train", [True, False])
def test_image_classification(images: Path, train: bool) -> None:
    batches = _batches(images, task="image_classification", train=train)
    assert sorted(_keys(batches)) == [f"s{i:03d}" for i in range(NUM_IMAGES)]
    for batch in batches:
        assert batch["images"].dtype == torch.uint8
        assert batch["images"].shape == (len(batch["keys"]), 3, SIZE, SIZE)
        assert ("erase" in batch) == train  # each image's random-erasing box, filled on the device
        if train:
            assert batch["erase"].dtype == torch.long and batch["erase"].shape == (len(batch["keys"]), 4)
        assert batch["labels"].dtype == torch.long
        assert batch["labels"].tolist() == [_index(key) % 3 for key in batch["keys"]]


@pytest.mark.parametrize(("task", "train"), [("image_classification", False), ("image_caption", False),
                                           ("image_caption", True), ("image_retrieval", True)])
def test_uint8_images_are_normalised_on_the_device_to_the_host_values(task: str, train: bool) -> None:
    image = Image.open(io.BytesIO(_image_bytes(3, "PNG"))).convert("RGB")
    family = TASKS[task].family
    host = caption_train_transform(SIZE) if train else image_transform(ModelConfig(image_size=SIZE), family)
    travelling = build_image_transform(task, SIZE, train=train)
    torch.manual_seed(5)
    expected = host(image)  # ToTensor and Normalize here
    torch.manual_seed(5)
    pixels = travelling(image)  # the same random crop and flip
    assert pixels.dtype == torch.uint8 and expected.dtype == torch.float32
    assert torch.equal(visual_input({"images": pixels[None]}, torch.device("cpu")), expected[None])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_classification_training_erases_the_box_timm_would_with_noise_drawn_on_the_device() -> None:
    image = Image.open(io.BytesIO(_image_bytes(3, "PNG"))).convert("RGB")
    timm_transform, travelling = classification_train_transform(SIZE), build_image_transform(
        "image_classification", SIZE, train=True)
    erased = 0
    for seed in range(40):
        _seed_everything(seed)
        expected = timm_transform(image)  # crop, flip, RandAugment, normalise and erase in one process
        _seed_everything(seed)
        pixels = travelling(image)
        box = erasing_box(SIZE)  # drawn next from Python's random, as timm's RandomErasing drew it
        plain = visual_input({"images": pixels[None]}, torch.device("cpu"))[0]
        filled = visual_input({"images": pixels[None], "erase": torch.tensor([box])}, torch.device("cpu"))[0]
        top, left, height, width = box
        inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        inside[top : top + height, left : left + width] = True
        assert torch.equal((expected != plain).any(0), inside)  # timm erased exactly this box
        assert torch.equal(filled[:, ~inside], expected[:, ~inside])  # the rest is the same image
        assert not (filled[:, inside] == plain[:, inside]).any()  # and the box is noise
        erased += height > 0
    assert 3 <= erased <= 20  # probability 0.25


def test_erasing_fills_each_box_and_nothing_else() -> None:
    pixels = torch.zeros(3, 3, 6, 5)
    boxes = torch.tensor([[1, 2, 2, 3], [0, 0, 0, 0], [5, 0, 1, 5]])
    torch.manual_seed(0)
    out = visual_input({"images": pixels.to(torch.uint8), "erase": boxes}, torch.device("cpu"))
    changed = (out != visual_input({"images": pixels.to(torch.uint8)}, torch.device("cpu"))).any(1)
    expected = torch.zeros(3, 6, 5, dtype=torch.bool)
    expected[0, 1:3, 2:5] = True
    expected[2, 5, :] = True
    assert torch.equal(changed, expected)


def test_label_set(images: Path) -> None:
    batch = _batches(images, task="image_classification", train=False, label_set="colour")[0]
    assert batch["labels"].tolist() == [_index(key) % 2 for key in batch["keys"]]


@pytest.mark.parametrize("task", ["image_caption", "image_retrieval"])
@pytest.mark.parametrize("train", [True, False])
def test_image_text(images: Path, task: str, train: bool) -> None:
    batches = _batches(images, task=task, train=train, max_text_len=6)
    assert len(_keys(batches)) == NUM_IMAGES
    for batch in batches:
        captions = [_captions(_index(key)) for key in batch["keys"]]
        assert batch["captions"] == captions
        assert batch["images"].shape == (len(captions), 3, SIZE, SIZE)
        tokenizer = get_tokenizer()
        if train:  # one caption drawn at random per sample: find which
            rows = [ids[~pad].tolist() for ids, pad in zip(batch["text_ids"], batch["text_padding"], strict=True)]
            chosen = [next(c for c in caps if tokenizer.encode(c, max_len=6) == row)
                      for caps, row in zip(captions, rows, strict=True)]
        else:
            chosen = [caps[0] for caps in captions]
        ids, padding = tokenizer.encode_batch(chosen, max_len=6)
        assert batch["text_ids"].dtype == torch.long and batch["text_padding"].dtype == torch.bool
        assert torch.equal(batch["text_ids"], ids) and torch.equal(batch["text_padding"], padding)


@pytest.mark.parametrize("task", ["video_classification", "video_caption", "video_retrieval"])
def test_video_train(videos: Path, task: str) -> None:
    batches = _batches(videos, task=task, train=True, batch_size=3)
    assert len(_keys(batches)) == NUM_VIDEOS
    for batch in batches:
        assert batch["videos"].dtype == torch.uint8
        assert batch["videos"].shape == (len(batch["keys"]), FRAMES, 3, SIZE, SIZE)
        assert ("labels" in batch) == (task == "video_classification")
        assert ("text_ids" in batch) == (task != "video_classification")


def test_video_eval_views(videos: Path) -> None:
    batches = _batches(videos, task="video_classification", train=False, batch_size=3, num_views=3, num_clips=2)
    assert len(_keys(batches)) == NUM_VIDEOS
    for batch in batches:
        assert batch["num_views"] == 6
        assert batch["videos"].shape == (len(batch["keys"]) * 6, FRAMES, 3, SIZE, SIZE)
        assert batch["labels"].tolist() == [_index(key) % 3 for key in batch["keys"]]
    again = _batches(videos, task="video_classification", train=False, batch_size=3, num_views=3, num_clips=2)
    assert torch.equal(batches[0]["videos"], again[0]["videos"])  # evaluation is deterministic


@pytest.mark.parametrize(("height", "width"), [(SIZE, SIZE + 16), (40, 56)])
def test_uint8_video_views_are_the_float_views_rounded_to_a_level(height: int, width: int) -> None:
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, FRAMES, height, width, 3), np.uint8))
    expected = video_views(frames, SIZE)  # the reference's float views, normalised with mean and std 0.5
    travelling = video_views_uint8(frames, SIZE)
    assert travelling.dtype == torch.uint8
    got = visual_input({"videos": travelling}, torch.device("cpu"))
    if height == SIZE:  # no resize: the frames' own pixels, so the same values
        assert torch.equal(got, expected)
    else:  # resized pixels rounded to the nearest of 256 levels: at most half a level, 1 / 255 after the std 0.5
        assert 0 < (got - expected).abs().max() <= 1 / 255 + 1e-6


def test_text_mlm(texts: Path) -> None:
    batches = _batches(texts, task="text_mlm", train=False)
    keys = _keys(batches)
    assert sorted(keys) == [f"s{i:03d}" for i in range(NUM_TEXTS)]
    passages = [" ".join((f"passage {_index(k)}. " + "words " * (20 * _index(k))).split()) for k in keys]
    ids, _ = get_tokenizer().encode_batch(passages, max_len=128)
    assert ids.shape[1] == 128  # the default MLM length
    got = torch.cat([torch.nn.functional.pad(b["text_ids"], (0, 128 - b["text_ids"].shape[1])) for b in batches])
    assert torch.equal(got, ids)


def test_frame_positions() -> None:
    rng = random.Random(0)
    assert train_indices(6, 32.0, 4, rng) == [0, 2, 4, 0]  # short video: start 0, wrapping
    starts = {train_indices(300, 32.0, 4, rng)[0] for _ in range(200)}
    assert min(starts) >= 0 and max(starts) < 300 - 97 and len(starts) > 50
    assert eval_indices(300, 32, 30.0, 4) == [[0, 32, 64, 96]]
    assert eval_indices(300, 32, 30.0, 2, num_clips=4) == [[0, 32], [8, 40], [16, 48], [24, 56]]
    assert eval_indices(300, 32, 15.0, 3) == [[0, 16, 32]]  # the stride follows the frame rate


@pytest.mark.parametrize(("train", "world_size"), [(True, 2), (False, 2), (True, 3)])
def test_processes_and_workers_cover_an_epoch_once(images: Path, train: bool, world_size: int) -> None:
    # 2 processes x 2 workers read 4 shards; 3 x 2 readers are more than the shards: they split by sample.
    keys: list[str] = []
    for rank in range(world_size):
        loader = make_loader(images, task="image_classification", train=train, batch_size=4, image_size=SIZE,
                             num_workers=2, rank=rank, world_size=world_size, seed=3)
        keys += _keys(list(loader))
    assert sorted(keys) == [f"s{i:03d}" for i in range(NUM_IMAGES)]


def test_training_order_is_seeded_and_changes_per_epoch(images: Path) -> None:
    def order(seed: int) -> list[str]:
        return _keys(_batches(images, task="image_classification", train=True, seed=seed, shuffle_buffer=8))

    assert order(1) == order(1)
    assert order(1) != order(2)
    loader = make_loader(images, task="image_classification", train=True, batch_size=4, image_size=SIZE, epochs=2)
    first, second = _keys(list(loader)), _keys(list(loader))
    assert len(first) == 2 * NUM_IMAGES and Counter(first) == Counter(second) and first != second


@pytest.mark.parametrize(("task", "workers", "world"), [("image_classification", 0, 1), ("image_classification", 2, 1),
                                                        ("image_caption", 2, 1), ("image_classification", 1, 5)])
def test_a_restored_loader_goes_on_exactly_without_decoding_what_was_handed_out(images: Path, task: str,
                                                                              workers: int, world: int) -> None:
    """Augmented, shuffled through a small buffer, over several epochs, with workers, and split by sample (5
    processes, 4 shards): a loader restored from the state after 7 batches hands out what the first one handed
    out next, image for image."""
    def loader():  # noqa: ANN202
        return make_loader(images, task=task, train=True, batch_size=5 if world == 1 else 2, image_size=SIZE,
                           epochs=None, seed=4, shuffle_buffer=6, num_workers=workers, rank=world - 2,
                           world_size=world)

    first, stream = loader(), None
    stream = iter(first)
    handed = [next(stream) for _ in range(7)]  # 35 samples: more than an epoch of 24
    state, augmentation = first.state(), global_rng_state()  # without workers: this process's RNGs (the run keeps)
    expected = [next(stream) for _ in range(5)]
    again = loader()
    again.restore(state)
    set_global_rng_state(augmentation)
    got = list(islice(again, 5))
    assert [b["keys"] for b in got] == [b["keys"] for b in expected] != [b["keys"] for b in handed[:5]]
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a["images"], b["images"])
        if task == "image_caption":
            assert torch.equal(a["text_ids"], b["text_ids"])  # the same caption drawn


def test_a_restored_loader_decodes_only_what_it_hands_out(images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def loader() -> ShardLoader:
        return make_loader(images, task="image_classification", train=True, batch_size=5, image_size=SIZE,
                           epochs=None, seed=4, shuffle_buffer=6)

    first = loader()
    stream = iter(first)
    for _ in range(20):  # four epochs
        next(stream)
    state = first.state()
    decoded = []
    real = SampleDecoder.__call__
    monkeypatch.setattr(SampleDecoder, "__call__", lambda self, raw, rng: decoded.append(raw) or real(self, raw, rng))
    again = loader()
    again.restore(state)
    batch = next(iter(again))
    assert len(decoded) == 5 and batch["keys"] == next(stream)["keys"]


def test_subset_is_class_balanced_and_shared(images: Path) -> None:
    shards = sorted(str(p) for p in images.glob("shard-*.tar"))
    subset = choose_subset(shards, 0.1, seed=5, balanced=True)
    per_class = Counter(_index(key) % 3 for _, key in subset)
    assert per_class == {0: 1, 1: 1, 2: 1}  # int(0.1 * 8) + 1 per class
    assert subset == choose_subset(shards, 0.1, seed=5, balanced=True)
    assert subset != choose_subset(shards, 0.1, seed=6, balanced=True)
    assert len(choose_subset(shards, 0.25, seed=5, balanced=False)) == 6

    keys: list[str] = []
    for rank in range(2):
        loader = make_loader(images, task="image_classification", train=True, batch_size=2, image_size=SIZE,
                             subset=0.1, seed=5, rank=rank, world_size=2)
        assert loader.subset == subset  # the same subset on every process
        keys += _keys(list(loader))
    assert sorted(keys) == sorted(key for _, key in subset)


def test_a_caption_subset_draws_caption_pairs(images: Path) -> None:
    """Caption and retrieval data: the fraction of (image, caption) pairs, as the reference draws them; an image comes
    with the captions drawn for it, the same on every process."""
    shards = sorted(str(p) for p in images.glob("shard-*.tar"))
    subset = choose_subset(shards, 0.25, seed=3, balanced=False, captions=True)
    assert sum(len(indices) for indices in subset.values()) == int(0.25 * 2 * NUM_IMAGES)  # 12 of 48 pairs
    assert all(indices and set(indices) <= {0, 1} for indices in subset.values())
    assert subset == choose_subset(shards, 0.25, seed=3, balanced=False, captions=True)
    chosen = {key: indices for (_, key), indices in subset.items()}
    for rank in range(2):
        loader = make_loader(images, task="image_caption", train=True, batch_size=2, image_size=SIZE, subset=0.25,
                             seed=3, rank=rank, world_size=2, augment=False)
        assert loader.subset == subset
        for batch in loader:
            for key, captions in zip(batch["keys"], batch["captions"], strict=True):
                assert captions == [_captions(_index(key))[i] for i in chosen[key]]
    # resumed: the samples in the shuffle buffer, read again for their members, keep their drawn captions
    def endless() -> ShardLoader:
        return make_loader(images, task="image_caption", train=True, batch_size=2, image_size=SIZE, subset=0.25,
                           seed=3, epochs=None, shuffle_buffer=6, augment=False)

    first = endless()
    stream = iter(first)
    for _ in range(7):
        next(stream)
    again = endless()
    again.restore(first.state())
    resumed = list(islice(again, 8))
    assert [b["keys"] for b in resumed] == [next(stream)["keys"] for _ in range(8)]
    for batch in resumed:
        for key, captions in zip(batch["keys"], batch["captions"], strict=True):
            assert captions == [_captions(_index(key))[i] for i in chosen[key]]
    by_item = make_loader(images, task="image_caption", train=True, batch_size=2, image_size=SIZE, subset=0.25,
                          seed=3, subset_by="item").subset  # the reference's COCO: images with all their captions
    assert len(by_item) == 6 and set(by_item.values()) == {None}
    evaluation = make_loader(images, task="image_caption", train=False, batch_size=24, image_size=SIZE)
    assert all(len(c) == 2 for c in next(iter(evaluation))["captions"])  # no subset: every caption


def test_caption_counts_survive_planted_and_damaged_shards(tmp_path: Path) -> None:
    """The caption-pair draw reads each json as the stream does: a json the loader skips, or a shard cut short,
    counts 1 caption (the stream then skips and counts the sample), never a traceback."""
    from uniperceiver_cli.data.loader import _caption_counts

    members = {"a.json": json.dumps({"captions": ["x", "y", "z"]}).encode(), "b.json": b"[" * 100_000,
               "c.JSON": b'{"captions": ["p", "q"]}', "d.json": b"\xff\xfe", "e.json": b"[1, 2]", "f.jpg": b"?"}
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert _caption_counts(str(shard)) == {("shard-000000.tar", "a"): 3, ("shard-000000.tar", "c"): 2}
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[:1636])  # inside b.json's data (a's header and data take 1,024 bytes)
    assert _caption_counts(str(cut)) == {("cut.tar", "a"): 3}
    (tmp_path / "garbage.tar").write_bytes(b"not a tar at all" * 100)
    assert _caption_counts(str(tmp_path / "garbage.tar")) == {}


def test_bad_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    images = [Sample(f"i{i}", image=_image_bytes(i, "JPEG"), label=0, meta=_meta(i)) for i in range(7)]
    images[2].image = b"not an image"
    images[4].meta = {"captions": ["   "]}
    image_dir = _write(tmp_path / "images", images, "image")
    loader = make_loader(image_dir, task="image_caption", train=True, batch_size=2, image_size=SIZE)
    assert sorted(_keys(list(loader))) == ["i0", "i1", "i3", "i5", "i6"]
    assert loader.skipped == {"undecodable image": 1, "empty caption": 1}

    videos = [Sample(f"v{i}", video=_video_bytes(i), label=1) for i in range(5)]
    videos[1].video = b""
    videos[3].video = b"\x00" * 500
    video_dir = _write(tmp_path / "videos", videos, "video")
    loader = make_loader(video_dir, task="video_classification", train=False, batch_size=2, image_size=SIZE,
                         num_frames=FRAMES, num_workers=2)
    assert sorted(_keys(list(loader))) == ["v0", "v2", "v4"]
    assert loader.skipped == {"empty video": 1, "undecodable video": 1}  # counted across worker processes


def test_truncated_shards_are_counted_and_the_rest_read(images: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(images, damaged)
    half = damaged / "shard-000001.tar"
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    boundary = damaged / "shard-000002.tar"  # cut exactly before a sample: tarfile sees a clean end
    with tarfile.open(boundary) as tar:
        offset = next(m.offset for m in tar.getmembers()[1:] if m.name.endswith((".jpg", ".png")))
    boundary.write_bytes(boundary.read_bytes()[:offset])
    loader = make_loader(damaged, task="image_classification", train=False, batch_size=4, image_size=SIZE)
    keys = set(_keys(list(loader)))
    assert loader.skipped == {"unreadable shard": 2}
    for shard in ("shard-000000", "shard-000003"):  # the undamaged shards are read completely
        assert set(json.loads((images / f"{shard}.json").read_text())["keys"]) <= keys


def _one_shard(directory: Path, samples: list[Sample]) -> Path:
    manifest = Manifest(dataset="test", split="val", modality="image", tasks=[], source="test")
    write_shards(directory, samples, lambda sample: sample, manifest=manifest, min_shards=1, progress=False)
    return directory / "shard-000000.tar"


def _wipe_headers(tar: Path, *members: str, fill: str = "random") -> None:
    """Overwrite the header block of each member (its first extension header, if it has one)."""
    with tarfile.open(tar) as archive:
        offsets = [archive.getmember(member).offset for member in members]
    data = bytearray(tar.read_bytes())
    for offset in offsets:
        data[offset : offset + 512] = random.Random(offset).randbytes(512) if fill == "random" else bytes(512)
    tar.write_bytes(bytes(data))


def _pngs(count: int) -> list[Sample]:
    return [Sample(f"s{i:03d}", image=_image_bytes(i, "PNG"), image_ext="png", label=i % 3, meta=_meta(i))
            for i in range(count)]


@pytest.mark.parametrize(("member", "fill"), [
    ("s000.png", "random"), ("s000.json", "random"),  # the shard's first sample: its first and last member
    ("s005.png", "random"), ("s005.cls", "random"), ("s005.json", "random"), ("s005.png", "zeros"),
    ("s011.png", "random"), ("s011.json", "zeros"),  # the last sample
])
def test_a_damaged_member_header_loses_only_its_sample(tmp_path: Path, member: str, fill: str) -> None:
    samples = _pngs(12)
    _wipe_headers(_one_shard(tmp_path, samples), member, fill=fill)
    loader = make_loader(tmp_path, task="image_classification", train=False, batch_size=5, image_size=SIZE)
    batches = list(loader)
    lost = member.split(".")[0]
    assert _keys(batches) == [s.key for s in samples if s.key != lost]  # the 11 others, in order
    assert torch.cat([b["labels"] for b in batches]).tolist() == [s.label for s in samples if s.key != lost]
    assert loader.skipped == {"unreadable member": 1}  # and no "unreadable shard" for the 11 of 12 read


def test_a_damaged_one_member_sample_counts_once(tmp_path: Path) -> None:
    samples = [Sample(f"t{i:02d}", text=f"passage {i} " * (30 * i + 1)) for i in range(12)]
    _wipe_headers(_one_shard(tmp_path, samples), "t04.txt")
    loader = make_loader(tmp_path, task="text_mlm", train=False, batch_size=5, image_size=SIZE)
    assert _keys(list(loader)) == [s.key for s in samples if s.key != "t04"]
    assert loader.skipped == {"unreadable member": 1}


def test_damage_and_truncation_in_one_shard_count_once_each(tmp_path: Path) -> None:
    samples = _pngs(12)
    tar = _one_shard(tmp_path, samples)
    with tarfile.open(tar) as archive:
        cut = archive.getmember("s009.cls").offset_data + 1  # inside s009's data: s009 is lost, s008 is kept
    _wipe_headers(tar, "s002.png", "s003.json")  # two damaged stretches
    tar.write_bytes(tar.read_bytes()[:cut])
    loader = make_loader(tmp_path, task="image_classification", train=False, batch_size=5, image_size=SIZE)
    assert _keys(list(loader)) == ["s000", "s001", "s004", "s005", "s006", "s007", "s008"]
    assert loader.skipped == {"unreadable member": 2, "unreadable shard": 1}


def _tar_of(path: Path, members: list[tuple[str, bytes]], fmt: int, *, listed: bool = False) -> Path:
    """A tar of ``members``; ``listed``: with a stats file next to it that lists its samples, as prepare-data's."""
    samples: dict[str, list[str]] = {}
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            key, ext = name.split(".", 1)
            samples.setdefault(key, []).append(ext.lower())
    if listed:
        path.with_suffix(".json").write_text(json.dumps({"keys": list(samples), "members": list(samples.values())}))
    return path


def _cut(tar: Path, offset: int) -> None:
    tar.write_bytes(tar.read_bytes()[:offset])


def _offset(tar: Path, member: str) -> int:
    """Where ``member``'s first header (its extension header, if it has one) starts."""
    with tarfile.open(tar) as archive:
        return archive.getmember(member).offset


def _samples(keys: list[str]) -> list[tuple[str, bytes]]:
    """Members of image classification samples, ``cls`` before ``png``."""
    return [(f"{key}.{ext}", data) for i, key in enumerate(keys)
            for ext, data in (("cls", str(i).encode()), ("png", _image_bytes(i, "PNG")))]


def _read(urls: list[Path] | Path) -> tuple[list[str], ShardLoader]:
    source = [str(url) for url in urls] if isinstance(urls, list) else urls
    loader = make_loader(source, task="image_classification", train=False, batch_size=4, image_size=SIZE)
    return _keys(list(loader)), loader


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_pax_and_gnu_long_names(tmp_path: Path, fmt: int) -> None:
    keys = [f"folder/{'long' * 30}_{i}" + ("_é" if i == 1 else "") for i in range(4)]  # > 100 bytes: extension headers
    members = [(f"{key}.{ext}", data) for i, key in enumerate(keys)
               for ext, data in (("PNG", _image_bytes(i, "PNG")), ("cls", str(i).encode()))]
    tar = _tar_of(tmp_path / "shard.tar", members, fmt, listed=True)
    loader = make_loader([str(tar)], task="image_classification", train=False, batch_size=4, image_size=SIZE)
    batches = list(loader)
    assert _keys(batches) == keys and batches[0]["labels"].tolist() == [0, 1, 2, 3] and loader.skipped == {}

    _wipe_headers(tar, f"{keys[2]}.PNG")  # the pax or GNU long-name header: the PNG is read under no key
    loader = make_loader([str(tar)], task="image_classification", train=False, batch_size=4, image_size=SIZE)
    assert _keys(list(loader)) == [keys[0], keys[1], keys[3]] and loader.skipped == {"unreadable member": 1}


def test_compressed_and_concatenated_tars(tmp_path: Path) -> None:
    raw = _one_shard(tmp_path / "plain", _pngs(6)).read_bytes()
    (tmp_path / "shard.tar.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "shard.tar.bz2").write_bytes(bz2.compress(raw))
    (tmp_path / "shard.tar.xz").write_bytes(lzma.compress(raw))
    (tmp_path / "twice.tar").write_bytes(raw + _one_shard(tmp_path / "more", _pngs(8)[6:]).read_bytes())
    for name, count in (("shard.tar.gz", 6), ("shard.tar.bz2", 6), ("shard.tar.xz", 6), ("twice.tar", 8)):
        loader = make_loader([str(tmp_path / name)], task="image_classification", train=False, batch_size=4,
                             image_size=SIZE)
        assert _keys(list(loader)) == [f"s{i:03d}" for i in range(count)] and loader.skipped == {}


def test_not_a_tar_counts_as_an_unreadable_shard(tmp_path: Path) -> None:
    (tmp_path / "noise.tar").write_bytes(random.Random(0).randbytes(5000))
    (tmp_path / "empty.tar").write_bytes(b"")
    loader = make_loader([str(tmp_path / "noise.tar"), str(tmp_path / "empty.tar")], task="image_classification",
                         train=False, batch_size=4, image_size=SIZE)
    assert list(loader) == [] and loader.skipped == {"unreadable shard": 2}


@pytest.mark.parametrize("prefix", ["BZh0", "BZh91AY&SY", "\x1f\udc8b\x08"])  # bzip2's and gzip's magic bytes
def test_a_first_file_named_like_compression_magic_is_read_as_a_plain_tar(tmp_path: Path, prefix: str) -> None:
    keys = [f"{prefix}{i:03d}" for i in range(3)]
    keys_read, loader = _read([_tar_of(tmp_path / "shard.tar", _samples(keys), tarfile.USTAR_FORMAT)])
    assert keys_read == keys and loader.skipped == {}


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
@pytest.mark.parametrize("listed", [True, False])
def test_a_cut_inside_an_extension_header_keeps_the_samples_before(tmp_path: Path, fmt: int, listed: bool) -> None:
    keys = [f"folder/{'long' * 30}_é{i}" for i in range(3)]  # > 100 bytes: pax or GNU long-name headers
    tar = _tar_of(tmp_path / "shard.tar", _samples(keys), fmt, listed=listed)
    _cut(tar, _offset(tar, f"{keys[1]}.cls") + 512 + 10)  # inside the pax records or the long name of k1.cls
    keys_read, loader = _read([tar])
    # k0 is complete; without the shard's listing the reader cannot tell (the cut header may have been k0's).
    assert keys_read == (keys[:1] if listed else []) and loader.skipped == {"unreadable shard": 1}


@pytest.mark.parametrize("into", [100, 0])  # bytes into the header; 0: a cut between members, no end blocks
@pytest.mark.parametrize(("member", "listed", "kept"), [
    ("b.png", True, ["a"]), ("b.png", False, ["a"]),  # b lost its png
    ("c.cls", True, ["a", "b"]), ("c.cls", False, ["a"]),  # b is complete: only its listing tells
])
def test_a_cut_inside_a_header_block_loses_the_sample_it_is_in(tmp_path: Path, member: str, listed: bool,
                                                                kept: list[str], into: int) -> None:
    tar = _tar_of(tmp_path / "shard.tar", _samples(["a", "b", "c"]), tarfile.USTAR_FORMAT, listed=listed)
    _cut(tar, _offset(tar, member) + into)
    keys_read, loader = _read([tar])
    assert keys_read == kept and loader.skipped == {"unreadable shard": 1}


def _image_sample(key: str, seed: int, ext: str = "jpg", meta: bool = True) -> Sample:
    return Sample(key, image=_image_bytes(seed, "PNG" if ext == "png" else "JPEG"), image_ext=ext, label=seed % 3,
                  meta=_meta(seed) if meta else {})


SCENARIOS = {  # samples with different members, one member's header damaged
    "first member, after a sample without json": (
        [_image_sample("a", 0), _image_sample("b", 1, meta=False), _image_sample("c", 2), _image_sample("d", 3)],
        "c.jpg"),
    "last member, before a png sample": (
        [_image_sample("x", 0), _image_sample("y", 1, "png"), _image_sample("z", 2, "png")], "x.json"),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_shard_listing_names_the_sample_that_lost_a_member(tmp_path: Path, scenario: str) -> None:
    samples, member = SCENARIOS[scenario]
    _wipe_headers(_one_shard(tmp_path, samples), member)
    keys_read, loader = _read(tmp_path)
    assert keys_read == [s.key for s in samples if s.key != member.split(".")[0]]
    assert loader.skipped == {"unreadable member": 1}


def test_without_a_listing_both_samples_next_to_damage_are_dropped(tmp_path: Path) -> None:
    samples, member = SCENARIOS["last member, before a png sample"]
    tar = _one_shard(tmp_path, samples)
    _wipe_headers(tar, member)
    tar.with_suffix(".json").unlink()  # no stats file: the stretch may be x's last member or y's first
    for source in (tmp_path, [tar]):
        keys_read, loader = _read(source)
        assert keys_read == ["z"] and loader.skipped == {"unreadable member": 2}


def test_native_video_messages_go_into_the_skip_not_stderr(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    video = _video_bytes(0)
    truncated = video[: len(video) // 2]  # the mp4 index ("moov" atom) is at the end
    with pytest.raises(Skip) as skip:
        eval_clip(truncated, SIZE, FRAMES)
    assert skip.value.reason == "undecodable video" and "moov atom not found" in skip.value.detail
    with pytest.raises(Skip, match="undecodable video"):
        train_clip(truncated, SIZE, FRAMES, random.Random(0))
    samples = [Sample(f"v{i}", video=truncated if i == 1 else _video_bytes(i), label=1) for i in range(3)]
    video_dir = _write(tmp_path / "videos", samples, "video")
    loader = make_loader(video_dir, task="video_classification", train=False, batch_size=2, image_size=SIZE,
                         num_frames=FRAMES)  # num_workers=0: decoded in this process
    assert sorted(_keys(list(loader))) == ["v0", "v2"] and loader.skipped == {"undecodable video": 1}
    assert capfd.readouterr().err == ""
    os.write(2, b"fd 2 is back\n")
    assert capfd.readouterr().err == "fd 2 is back\n"


def test_randaugment_inc1_survives_pillow_13() -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)) for _ in range(50)]
    transform = classification_train_transform(SIZE)
    for op in next(t for t in transform.transforms if isinstance(t, RandAugment)).ops:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0  # PosterizeIncreasing asked for 0 bits here
        op(images[0])
    transform = classification_train_transform(SIZE)
    for image in images:
        assert transform(image).shape == (3, SIZE, SIZE)


def test_mixer_follows_weights_and_seed() -> None:
    loaders = {"a": iter(int, 1), "b": iter(int, 1)}  # endless zeros
    draws = [name for name, _ in islice(mix_tasks(loaders, {"a": 3, "b": 1}, seed=0), 4000)]
    assert abs(draws.count("a") / 4000 - 0.75) < 0.03

    def sequence(**kwargs) -> list[str]:
        return [name for name, _ in islice(mix_tasks({"a": [0] * 50, "b": [0] * 50}, {"a": 3, "b": 1}, **kwargs), 40)]

    assert sequence(seed=1) == sequence(seed=1)
    assert sequence(seed=1) != sequence(seed=2)
    assert sequence(seed=1, rank=0) != sequence(seed=1, rank=1)
    with pytest.raises(ValueError, match="different tasks"):
        next(mix_tasks({"a": []}, {"b": 1.0}))
