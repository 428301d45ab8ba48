"""Source converters through ``uniperceiver prepare-data``: every layout, read back sample by sample."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from uniperceiver_cli.cli.app import app
from uniperceiver_cli.data.shards import Manifest
from uniperceiver_cli.data.sources.common import safe_key

runner = CliRunner()
GARBAGE = b"this is not an image or a video"


@lru_cache
def jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 6), ((seed * 37) % 256, (seed * 91) % 256, 7)).save(out, format="JPEG")
    return out.getvalue()


@lru_cache
def png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (5, 7), (7, (seed * 53) % 256, 200)).save(out, format="PNG")
    return out.getvalue()


@lru_cache
def mp4(seed: int) -> bytes:
    """4 frames of 32x32 H.264."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(4):
            pixels = np.full((32, 32, 3), (seed * 40 + i * 10) % 256, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return out.getvalue()


def put(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def prepare(*args: str | Path, code: int = 0):
    result = runner.invoke(app, ["prepare-data", *map(str, args), "--no-progress"], env={"COLUMNS": "200"})
    assert result.exit_code == code, result.output
    return result


def read_split(directory: Path) -> tuple[Manifest, dict[str, dict[str, bytes]]]:
    """The manifest and every sample (key -> extension -> bytes), read with WebDataset."""
    manifest = Manifest.load(directory)
    samples = {}
    for sample in wds.WebDataset(manifest.shard_paths(directory), shardshuffle=False, empty_check=False):
        key = sample.pop("__key__")
        sample.pop("__url__"), sample.pop("__local_path__", None)
        assert key not in samples
        samples[key] = sample
    assert len(samples) == manifest.num_samples == sum(s.samples for s in manifest.shards)
    return manifest, samples


def meta(sample: dict[str, bytes]) -> dict:
    return json.loads(sample["json"])


def fails(result, *words: str) -> None:
    """Exit code 2 and one line on stderr naming ``words``; no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- ImageNet


def test_imagenet_class_folders(tmp_path):
    src = tmp_path / "in1k"
    expected = {}
    for split in ("train", "val"):
        for c, wnid in enumerate(("n02", "n01", "n03")):  # sorted: n01 n02 n03
            for i in range(3):
                data, ext = (png(c * 10 + i), "png") if i == 2 else (jpeg(c * 10 + i), "JPEG")
                put(src / split / wnid / f"{wnid}_{i}.{ext}", data)
                expected[split, f"{wnid}_{wnid}_{i}"] = data, sorted(["n01", "n02", "n03"]).index(wnid)
    put(src / "train" / "n01" / "broken.JPEG", GARBAGE)
    put(src / "train" / "n01" / "notes.txt", "not an image: ignored")
    names = put(tmp_path / "names.txt", "goldfish\ntench\nshark\n")
    result = prepare("imagenet", src, "--out", tmp_path / "out", "--class-names", names, "--min-shards", "2")
    assert "undecodable image" in result.stdout and "samples" in result.stdout
    for split in ("train", "val"):
        manifest, samples = read_split(tmp_path / "out" / split)
        assert manifest.classes == ["goldfish", "tench", "shark"] and manifest.tasks == ["image_classification"]
        assert manifest.modality == "image" and len(manifest.shards) == 2
        assert manifest.skipped == ({"undecodable image": 1} if split == "train" else {})
        assert len(samples) == 9
        for key, sample in samples.items():
            data, label = expected[split, key]
            assert sample["png" if data.startswith(b"\x89PNG") else "jpg"] == data
            assert int(sample["cls"]) == label and meta(sample)["label"] == manifest.classes[label]


def test_imagenet_meta_lists_and_split_selection(tmp_path):
    src = tmp_path / "imagenet"
    put(src / "meta" / "train.txt", "n01/n01_1.JPEG 0\nn01/n01_2.JPEG 0\nn07/n07_1.JPEG 1\nn07/gone.JPEG 1\n")
    put(src / "meta" / "val.txt", "ILSVRC2012_val_00000001.JPEG 1\nILSVRC2012_val_00000002.JPEG 0\n\n")
    for i, rel in enumerate(("n01/n01_1.JPEG", "n01/n01_2.JPEG", "n07/n07_1.JPEG")):
        put(src / "train" / rel, jpeg(i))
    put(src / "val" / "ILSVRC2012_val_00000001.JPEG", jpeg(5))
    put(src / "val" / "ILSVRC2012_val_00000002.JPEG", png(6))
    prepare("imagenet", src, "--out", tmp_path / "out", "--split", "val")
    assert not (tmp_path / "out" / "train").exists()
    manifest, samples = read_split(tmp_path / "out" / "val")
    assert manifest.classes == ["n01", "n07"] and manifest.skipped == {}
    assert samples["ILSVRC2012_val_00000001"]["jpg"] == jpeg(5)
    assert samples["ILSVRC2012_val_00000002"]["png"] == png(6)
    assert int(samples["ILSVRC2012_val_00000002"]["cls"]) == 0
    prepare("imagenet", src, "--out", tmp_path / "out")
    manifest, samples = read_split(tmp_path / "out" / "train")
    assert manifest.skipped == {"missing file": 1} and manifest.skipped_examples[0]["reason"] == "missing file"
    assert {k: int(s["cls"]) for k, s in samples.items()} == {"n01_n01_1": 0, "n01_n01_2": 0, "n07_n07_1": 1}
    assert samples["n07_n07_1"]["jpg"] == jpeg(2) and meta(samples["n07_n07_1"])["source"] == "n07/n07_1.JPEG"


def test_imagenet_wrong_layouts(tmp_path):
    put(tmp_path / "flat" / "train" / "a.jpg", jpeg(0))
    fails(prepare("imagenet", tmp_path / "flat", "--out", tmp_path / "out", code=2), "expected layout")
    (tmp_path / "empty" / "train" / "n01").mkdir(parents=True)
    result = prepare("imagenet", tmp_path / "empty", "--out", tmp_path / "out", code=2)
    fails(result, "neither class folders nor meta lists")
    fails(prepare("imagenet", tmp_path / "nowhere", "--out", tmp_path / "out", code=2), "not a folder")
    put(tmp_path / "ok" / "train" / "n01" / "a.jpg", jpeg(0))
    fails(prepare("imagenet", tmp_path / "ok", "--out", tmp_path / "out", "--split", "val", code=2), "no split 'val'")
    put(tmp_path / "bad" / "meta" / "train.txt", "n01/a.jpg zero\n")
    result = prepare("imagenet", tmp_path / "bad", "--out", tmp_path / "out", code=2)
    fails(result, "train.txt:1", "relative_path label")
    assert not (tmp_path / "out").exists()


def test_imagenet21k_filelist(tmp_path):
    src = tmp_path / "in21k"
    put(src / "imagenet_22k_filelist_short.txt", "n001 1 0\nn001 2 0\nn009 5 1\nn009 6 1\n")
    for i, rel in enumerate(("n001/n001_1.JPEG", "n001/n001_2.JPEG", "n009/n009_5.JPEG")):
        put(src / rel, jpeg(i))
    prepare("imagenet21k", src, "--out", tmp_path / "out")
    manifest, samples = read_split(tmp_path / "out" / "train")
    assert manifest.classes == ["n001", "n009"] and manifest.skipped == {"missing file": 1}
    assert {k: (s["jpg"], int(s["cls"])) for k, s in samples.items()} == {
        "n001_1": (jpeg(0), 0), "n001_2": (jpeg(1), 0), "n009_5": (jpeg(2), 1)}
    names = put(tmp_path / "names.txt", "cat\ndog\n")
    prepare("imagenet21k", src, "--out", tmp_path / "named", "--class-names", names, "--split", "all")
    manifest, samples = read_split(tmp_path / "named" / "all")
    assert manifest.classes == ["cat", "dog"] and meta(samples["n009_5"])["label"] == "dog"
    fails(prepare("imagenet21k", tmp_path, "--out", tmp_path / "x", code=2), "imagenet_22k_filelist_short.txt")


# ---------------------------------------------------------------- COCO, Flickr30k, Visual Genome


def karpathy_image(split: str, filename: str, captions: list[str], **ids) -> dict:
    return {"split": split, "filename": filename, "sentences": [{"raw": c, "tokens": c.split()} for c in captions],
            **ids}


def test_coco_karpathy(tmp_path):
    images = tmp_path / "coco_images"
    records = [
        ("train", "train2014", 1, ["A man  riding a horse.", "a person on a horse "]),
        ("restval", "val2014", 2, ["two dogs"]),
        ("val", "val2014", 3, ["a red bus", "", "bus on a street"]),
        ("test", "val2014", 4, ["a cat"]),
        ("test", "val2014", 5, ["", "  "]),  # every caption empty
        ("train", "train2014", 6, ["a broken file"]),  # garbage bytes
        ("val", "val2014", 7, ["not on disk"]),  # missing
    ]
    data = {"images": [], "dataset": "coco"}
    for split, folder, cocoid, captions in records:
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        data["images"].append({**karpathy_image(split, name, captions, cocoid=cocoid, imgid=cocoid + 100),
                               "filepath": folder})
        if cocoid == 6:
            put(images / folder / name, GARBAGE)
        elif cocoid != 7:
            put(images / folder / name, jpeg(cocoid))
    annotations = put(tmp_path / "dataset_coco.json", json.dumps(data))
    result = prepare("coco", annotations, "--images", images, "--out", tmp_path / "out")
    assert "empty caption" in result.stdout
    found = {}
    for split in ("train", "val", "test"):
        manifest, samples = read_split(tmp_path / "out" / split)
        assert manifest.tasks == ["image_caption", "image_retrieval"] and manifest.modality == "image"
        for key, sample in samples.items():
            info = meta(sample)
            assert sample["jpg"] == jpeg(info["id"]) and sample["txt"].decode() == info["captions"][0]
            assert key == f"{info['source'].split('/')[0]}_COCO_{info['source'].split('/')[0]}_{info['id']:012d}"
            found[info["id"]] = split, info["captions"]
        skipped = {"train": {"undecodable image": 1}, "val": {"missing file": 1}, "test": {"empty caption": 1}}
        assert manifest.skipped == skipped[split]
    assert found == {1: ("train", ["A man riding a horse.", "a person on a horse"]), 2: ("train", ["two dogs"]),
                     3: ("val", ["a red bus", "bus on a street"]), 4: ("test", ["a cat"])}
    assert Manifest.load(tmp_path / "out" / "val").extra == {"captions": 3}


def test_coco_style_caption_files(tmp_path):
    images = tmp_path / "images"
    for split, ids in (("train2014", (11, 12, 13)), ("val2014", (21, 22))):
        data = {"images": [{"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg"} for i in ids],
                "annotations": [{"image_id": i, "id": n, "caption": f"caption {n} of {i}"}
                                for n, i in enumerate(ids * 2) if i != 13]}  # 13 has no caption
        put(tmp_path / f"captions_{split}.json", json.dumps(data))
        for i in ids:
            put(images / f"COCO_{split}_{i:012d}.jpg", png(i))
    prepare("coco", tmp_path / "captions_train2014.json", tmp_path / "captions_val2014.json", "--images", images,
            "--out", tmp_path / "out", "--name", "mscoco")
    manifest, samples = read_split(tmp_path / "out" / "train2014")
    assert manifest.dataset == "mscoco" and manifest.skipped == {"empty caption": 1} and len(samples) == 2
    manifest, samples = read_split(tmp_path / "out" / "val2014")
    sample = samples["COCO_val2014_000000000022"]
    assert sample["png"] == png(22) and meta(sample)["captions"] == ["caption 1 of 22", "caption 3 of 22"]
    fails(prepare("coco", tmp_path / "dataset_coco.json", "--out", tmp_path / "x", code=2),
          "dataset_coco.json not found")
    put(tmp_path / "broken.json", "{not json")
    fails(prepare("coco", tmp_path / "broken.json", "--out", tmp_path / "x", code=2), "not valid JSON")
    put(tmp_path / "other.json", json.dumps({"images": [{"file_name": "a.jpg"}]}))
    fails(prepare("coco", tmp_path / "other.json", "--out", tmp_path / "x", code=2), "Karpathy")


def test_flickr30k_karpathy(tmp_path):
    images = tmp_path / "flickr30k-images"
    data = {"images": [karpathy_image(split, f"{n}.jpg", [f"caption {n} a", f"caption {n} b"], imgid=i)
                       for i, (split, n) in enumerate((("train", 1000), ("train", 1001), ("val", 2000),
                                                       ("test", 3000)))]}
    for n in (1000, 2000, 3000):
        put(images / f"{n}.jpg", jpeg(n % 7))
    annotations = put(tmp_path / "dataset_flickr30k.json", json.dumps(data))
    prepare("flickr30k", annotations, "--images", images, "--out", tmp_path / "out", "--split", "train",
            "--split", "test")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test", "train"]
    manifest, samples = read_split(tmp_path / "out" / "train")
    assert manifest.skipped == {"missing file": 1}
    assert meta(samples["1000"]) == {"id": 1000, "source": "1000.jpg", "captions": ["caption 1000 a", "caption 1000 b"]}
    _, samples = read_split(tmp_path / "out" / "test")
    assert samples["3000"]["jpg"] == jpeg(3000 % 7) and samples["3000"]["txt"] == b"caption 3000 a"


def test_visual_genome(tmp_path):
    data = {"phrase": {"1": ["a tree ", "green grass!"], "2": ["sky"], "3": [], "4": ["no path for me"]},
            "subset": {"1": "VG_100K/1.jpg", "2": "VG_100K_2/2.jpg", "3": "VG_100K/3.jpg"}}
    annotations = put(tmp_path / "vg_captions_128filter.json", json.dumps(data))
    for i, rel in data["subset"].items():
        put(tmp_path / "vg" / rel, jpeg(int(i)))
    prepare("visual-genome", annotations, "--images", tmp_path / "vg", "--out", tmp_path / "out")
    manifest, samples = read_split(tmp_path / "out" / "train")
    assert manifest.skipped == {"empty caption": 1, "missing file": 1} and manifest.extra == {"captions": 4}
    assert meta(samples["VG_100K_1"])["captions"] == ["a tree.", "green grass!"]
    assert samples["VG_100K_2_2"]["txt"] == b"sky." and samples["VG_100K_2_2"]["jpg"] == jpeg(2)
    put(tmp_path / "wrong.json", json.dumps({"phrases": {}}))
    fails(prepare("visual-genome", tmp_path / "wrong.json", "--out", tmp_path / "x", code=2), "'phrase'")


# ---------------------------------------------------------------- image-text pairs


def test_image_text_tsv_jsonl_folders_and_zips(tmp_path):
    root = tmp_path / "cc"
    with zipfile.ZipFile(put(root / "train_image.zip", b""), "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("00000000.jpg", jpeg(0))
        archive.writestr("00000001.png", png(1))
        archive.writestr("00000002.jpg", GARBAGE)
    put(root / "folder" / "a.jpg", jpeg(10))
    put(root / "folder" / "b.jpg", jpeg(11))
    put(root / "train.tsv", "filepath\tcaption\n"
                            "train_image.zip@/00000000.jpg\ta dog on the beach\n"
                            "train_image.zip@/00000001.png\t  Hello,   world!  \n"
                            "train_image.zip@/00000002.jpg\tbroken image\n"
                            "train_image.zip@/missing.jpg\tnot in the zip\n"
                            "folder/a.jpg\t \n"
                            f"{root / 'folder' / 'b.jpg'}\tabsolute path 3\n")
    lines = [{"image": "train_image.zip@/00000000.jpg", "caption": ["<PERSON>", "walks", "a", "dog"]},
             {"image": "folder/a.jpg", "caption": "a title only", "title": "T", "description": "D"}]
    put(root / "train_spacy.json", "\n".join(json.dumps(line) for line in lines) + "\n")
    result = prepare("image-text", root / "train.tsv", root / "train_spacy.json", "--out", tmp_path / "out",
                     "--name", "cc3m", "--min-shards", "3")
    for reason in ("empty caption", "undecodable image", "missing file"):
        assert reason in result.stdout
    manifest, samples = read_split(tmp_path / "out" / "train")
    assert manifest.dataset == "cc3m"
    # 8 items in 3 shards: [0, 3) [3, 5) [5, 8); both items of the middle one are skipped, so it is not listed.
    assert [(s.file, s.samples) for s in manifest.shards] == [("shard-000000.tar", 2), ("shard-000002.tar", 3)]
    assert manifest.skipped == {"empty caption": 1, "missing file": 1, "undecodable image": 1}
    got = {k: (s.get("jpg") or s.get("png"), s["txt"].decode()) for k, s in samples.items()}
    absolute = safe_key(str(root / "folder" / "b"))
    assert got == {"train_image_zip__00000000": (jpeg(0), "a dog on the beach."),
                   "train_image_zip__00000001": (png(1), "Hello, world!"),
                   absolute: (jpeg(11), "absolute path 3."),
                   "train_image_zip__00000000-2": (jpeg(0), "person walks a dog."),
                   "folder_a-2": (jpeg(10), "a title only.")}  # folder_a: the skipped empty caption
    assert meta(samples["folder_a-2"]) == {"source": "folder/a.jpg", "title": "T", "description": "D",
                                         "captions": ["a title only."]}


def test_image_text_sbu_dict_and_images_root(tmp_path):
    put(tmp_path / "sbu" / "subcaption.json", json.dumps({"x/1.jpg": "Man in a boat", "x/2.jpg": "sunset 2"}))
    put(tmp_path / "imgs" / "x" / "1.jpg", jpeg(1))
    put(tmp_path / "imgs" / "x" / "2.jpg", jpeg(2))
    prepare("image-text", tmp_path / "sbu" / "subcaption.json", "--images", tmp_path / "imgs", "--split", "sbu",
            "--out", tmp_path / "out")
    _, samples = read_split(tmp_path / "out" / "sbu")
    assert {k: (s["jpg"], s["txt"]) for k, s in samples.items()} == {
        "x_1": (jpeg(1), b"Man in a boat."), "x_2": (jpeg(2), b"sunset 2.")}
    put(tmp_path / "bad.tsv", "only-a-path.jpg\n")
    fails(prepare("image-text", tmp_path / "bad.tsv", "--out", tmp_path / "x", code=2), "bad.tsv:1",
          "path<TAB>caption")
    put(tmp_path / "bad.csv", "a,b\n")
    fails(prepare("image-text", tmp_path / "bad.csv", "--out", tmp_path / "x", code=2), "unknown list format")


# ---------------------------------------------------------------- video


def test_kinetics_csv(tmp_path):
    videos = tmp_path / "k400"
    csv_rows = ["label,youtube_id,time_start,time_end,split"]
    expected = {}
    for n, (label, split) in enumerate((("riding a bike", "train"), ("abseiling", "train"), ("riding a bike", "train"),
                                        ("abseiling", "val"), ("zumba", "val"))):
        yid = f"yt{n}_-x"
        csv_rows.append(f"{label},{yid},{n},{n + 10},{split}")
        name = f"{yid}_{n:06d}_{n + 10:06d}"
        if n == 2:
            put(videos / split / label / f"{name}.mp4", GARBAGE)
        elif split == "train":
            put(videos / split / label.replace(" ", "_") / f"{name}.mp4", mp4(n))
        else:  # flat, named by id only
            put(videos / f"{yid}.webm" if n == 3 else videos / f"{yid}.mp4", mp4(n))
        expected[name] = n, label
    csv_rows.append("zumba,never_downloaded,0,10,val")
    annotations = put(tmp_path / "kinetics_400.csv", "\n".join(csv_rows) + "\n")
    prepare("kinetics", annotations, "--videos", videos, "--out", tmp_path / "out", "--name", "k400")
    classes = ["abseiling", "riding a bike", "zumba"]
    for split, skipped, count in (("train", {"undecodable video": 1}, 2), ("val", {"missing file": 1}, 2)):
        manifest, samples = read_split(tmp_path / "out" / split)
        assert manifest.classes == classes and manifest.tasks == ["video_classification"]
        assert manifest.skipped == skipped and len(samples) == count and manifest.modality == "video"
        for key, sample in samples.items():
            n, label = expected[key]
            ext = "webm" if n == 3 else "mp4"
            assert sample[ext] == mp4(n) and int(sample["cls"]) == classes.index(label)
            assert meta(sample)["label"] == label and meta(sample)["time_start"] == n
    put(tmp_path / "nolabel.csv", "youtube_id,split\nabc,train\n")
    fails(prepare("kinetics", tmp_path / "nolabel.csv", "--out", tmp_path / "x", code=2), "label column")


def test_kinetics_class_folders_and_workers(tmp_path):
    src = tmp_path / "mit"
    for split in ("training", "validation"):
        for c, label in enumerate(("running", "clapping")):
            for i in range(3):
                put(src / split / label / f"{label}_{i}.mp4", mp4(c * 3 + i))
    put(src / "training" / "running" / "zero.mp4", GARBAGE)
    prepare("kinetics", src, "--out", tmp_path / "one", "--min-shards", "3")
    prepare("kinetics", src, "--out", tmp_path / "two", "--min-shards", "3", "--workers", "2")
    for split in ("training", "validation"):
        manifest, samples = read_split(tmp_path / "one" / split)
        assert manifest.classes == ["clapping", "running"] and len(samples) == 6
        assert manifest.skipped == ({"undecodable video": 1} if split == "training" else {})
        for key, sample in samples.items():
            label, i = meta(sample)["label"], int(key[-1])
            assert key == f"{label}_{label}_{i}" and sample["mp4"] == mp4((label == "clapping") * 3 + i)
            assert int(sample["cls"]) == manifest.classes.index(label)
        for one in sorted((tmp_path / "one" / split).glob("shard-*")):  # parallel: byte-identical
            assert one.read_bytes() == (tmp_path / "two" / split / one.name).read_bytes()


def test_native_video_messages_go_into_the_manifest(tmp_path, capfd):
    src = tmp_path / "mit"
    put(src / "training" / "running" / "good.mp4", mp4(0))
    put(src / "training" / "running" / "cut.mp4", mp4(1)[: len(mp4(1)) // 2])  # the mp4 index is at the end
    prepare("kinetics", src, "--out", tmp_path / "out")
    manifest = Manifest.load(tmp_path / "out" / "training")
    assert manifest.num_samples == 1 and manifest.skipped == {"undecodable video": 1}
    [example] = manifest.skipped_examples
    assert example["detail"].startswith(str(src / "training" / "running" / "cut.mp4"))
    assert "moov atom not found" in example["detail"]
    assert "moov" not in capfd.readouterr().err


def test_msvd_and_msrvtt(tmp_path):
    videos = tmp_path / "YouTubeClips"
    for split, names in (("train", ("clip_a_1_5", "clip_b_2_9", "clip_c_0_3")), ("test", ("clip_d_4_8",))):
        data = {"images": [{"id": n, "file_name": name} for n, name in enumerate(names)],
                "annotations": [{"image_id": n, "caption": f"{name} does {k}"} for n, name in enumerate(names)
                                for k in ("this", "that") if name != "clip_b_2_9"]}
        put(tmp_path / f"caption_msvd_{split}_cocostyle.json", json.dumps(data))
    put(videos / "clip_a_1_5.avi", mp4(1))  # an mp4 stream with an .avi name: bytes kept as they are
    put(videos / "clip_b_2_9.avi", mp4(2))
    put(videos / "sub" / "ignored.txt", "x")
    put(videos / "clip_d_4_8.mp4", mp4(4))
    prepare("msvd", tmp_path / "caption_msvd_train_cocostyle.json", tmp_path / "caption_msvd_test_cocostyle.json",
            "--videos", videos, "--out", tmp_path / "out")
    manifest, samples = read_split(tmp_path / "out" / "train")
    assert manifest.tasks == ["video_caption", "video_retrieval"] and manifest.modality == "video"
    assert manifest.skipped == {"empty caption": 1, "missing file": 1}
    assert samples["clip_a_1_5"]["avi"] == mp4(1)
    assert meta(samples["clip_a_1_5"]) == {"id": 0, "source": "clip_a_1_5",
                                           "captions": ["clip_a_1_5 does this", "clip_a_1_5 does that"]}
    _, samples = read_split(tmp_path / "out" / "test")
    assert samples["clip_d_4_8"]["mp4"] == mp4(4) and samples["clip_d_4_8"]["txt"] == b"clip_d_4_8 does this"
    fails(prepare("msvd", tmp_path / "caption_msvd_test_cocostyle.json", "--videos", tmp_path / "no", "--out",
                  tmp_path / "x", code=2), "a folder of videos")


# ---------------------------------------------------------------- text


def test_text_passages(tmp_path):
    put(tmp_path / "corpus" / "wiki.doc", "one two three\n\nfour five six seven\neight\n  \nnine ten\n")
    put(tmp_path / "corpus" / "books" / "bc1g.doc", "a b c d e\nf g h\n")
    prepare("text", tmp_path / "corpus", "--out", tmp_path / "out", "--min-words", "5", "--name", "bookswiki")
    manifest, samples = read_split(tmp_path / "out" / "train")
    assert manifest.tasks == ["text_mlm"] and manifest.modality == "text" and manifest.skipped == {"empty text": 2}
    assert {k: s["txt"].decode() for k, s in samples.items()} == {
        "bc1g_000000001": "a b c d e", "bc1g_000000002": "f g h",
        "wiki_000000001": "one two three\nfour five six seven", "wiki_000000004": "eight\nnine ten"}
    assert meta(samples["wiki_000000004"]) == {"source": str(tmp_path / "corpus" / "wiki.doc"), "line": 4}
    fails(prepare("text", tmp_path / "absent.txt", "--out", tmp_path / "x", code=2), "absent.txt not found")


# ---------------------------------------------------------------- resume


def test_resume_rewrites_only_the_missing_shard(tmp_path):
    src = tmp_path / "in1k"
    for i in range(12):
        put(src / "train" / f"c{i % 3}" / f"{i}.jpg", jpeg(i))
    out = tmp_path / "out" / "train"
    prepare("imagenet", src, "--out", tmp_path / "out", "--min-shards", "4")
    shards = sorted(out.glob("shard-*.tar"))
    assert len(shards) == 4
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    manifest_before = Manifest.load(out)
    shards[1].unlink()
    prepare("imagenet", src, "--out", tmp_path / "out", "--min-shards", "4")
    for path, (mtime, data) in before.items():
        assert path.read_bytes() == data
        assert (path.stat().st_mtime_ns == mtime) == (path != shards[1])
    assert Manifest.load(out) == manifest_before
    with tarfile.open(shards[1]) as tar:
        assert len(tar.getnames()) == 3 * manifest_before.shards[1].samples  # jpg, cls and json each


@pytest.mark.parametrize("option", ["--min-shards", "--workers", "--max-per-shard"])
def test_bad_numbers_are_rejected(tmp_path, option):
    result = prepare("text", tmp_path, "--out", tmp_path / "out", option, "0", code=2)
    assert "Traceback" not in result.output


def test_toyworld_bad_settings_fail_cleanly(tmp_path):
    fails(prepare("toyworld", "--out", tmp_path / "toy", "--size", "tiny", "--image-size", "15", code=2), "image_size")
