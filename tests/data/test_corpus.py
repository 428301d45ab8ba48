"""The corpus target sets: every token of a split's texts, read once per process, past damage, without the media."""

import gzip
import io
import json
import os
import tarfile

import pytest
import webdataset as wds

from uniperceiver_cli.data import corpus, loader
from uniperceiver_cli.data.corpus import corpus_tokens, vocabulary_of
from uniperceiver_cli.data.shards import Manifest, Sample, write_shards
from uniperceiver_cli.data.toyworld import generate


@pytest.fixture(scope="module")
def toyworld(tmp_path_factory):
    root = tmp_path_factory.mktemp("toyworld")
    generate(root, size="tiny", image_size=32, num_frames=4, min_shards=2, progress=False)
    return root


def test_corpus_vocabulary_is_every_caption_token_read_once_per_process(toyworld, monkeypatch):
    from uniperceiver_cli.model.tokenizer import get_tokenizer

    folder = toyworld / "images" / "train"
    captions = [c for s in wds.WebDataset(sorted(map(str, folder.glob("*.tar"))), shardshuffle=False)
                for c in json.loads(s["json"])["captions"]]
    ids, padding = get_tokenizer().encode_batch(captions)
    expected = sorted(set(ids[~padding].tolist()) | {49407})
    assert vocabulary_of([folder]).tolist() == expected

    def no_reading(*args, **kwargs):
        raise AssertionError("read the shards again")

    monkeypatch.setattr(corpus, "read_shards", no_reading)
    assert vocabulary_of([folder]).tolist() == expected  # kept: no second scan
    stat = (folder / "manifest.json").stat()
    os.utime(folder / "manifest.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="read the shards again"):  # a rewritten split is read anew
        vocabulary_of([folder])


def test_corpus_vocabulary_reads_past_a_damaged_member_header(tmp_path):
    from uniperceiver_cli.model.tokenizer import get_tokenizer

    words = ["zebra", "giraffe", "elephant"]
    samples = [Sample(f"s{i}", image=b"image", meta={"captions": [word]}) for i, word in enumerate(words)]
    manifest = Manifest(dataset="t", split="train", modality="image", tasks=["image_caption"], source="t")
    write_shards(tmp_path, samples, lambda sample: sample, manifest=manifest, min_shards=1, progress=False)
    tar = tmp_path / "shard-000000.tar"
    with tarfile.open(tar) as archive:
        offset = archive.getmember("s1.jpg").offset
    data = bytearray(tar.read_bytes())
    data[offset : offset + 512] = bytes(range(256)) * 2  # s1.jpg's header fails its checksum
    tar.write_bytes(bytes(data))  # tarfile stops there: elephant (s2) was left out
    ids, padding = get_tokenizer().encode_batch(["zebra", "elephant"])  # s1 lost its image: the loader skips it
    assert corpus_tokens(tmp_path, Manifest.load(tmp_path)).tolist() == sorted(set(ids[~padding].tolist()) | {49407})


def test_corpus_seeks_past_the_images_and_reads_the_texts(tmp_path, monkeypatch):
    from uniperceiver_cli.model.tokenizer import get_tokenizer

    words = ["zebra", "giraffe", "elephant"]
    image = os.urandom(8 << 20)  # 8 MiB a sample: read, 24 MiB would pass through the file
    samples = [Sample(f"s{i}", image=image, meta={"captions": [word]}) for i, word in enumerate(words)]
    manifest = Manifest(dataset="t", split="train", modality="image", tasks=["image_caption"], source="t")
    write_shards(tmp_path, samples, lambda sample: sample, manifest=manifest, min_shards=1, progress=False)
    read = []

    class Counting(io.FileIO):  # bytes read from the file, unbuffered or through a buffer
        def read(self, size=-1):
            read.append(len(data := super().read(size)))
            return data

        def readinto(self, buffer):
            read.append(super().readinto(buffer))
            return read[-1]

    monkeypatch.setattr(loader, "open_shard", lambda shard, timeout: io.BufferedReader(Counting(shard.url)))
    ids, padding = get_tokenizer().encode_batch(words)
    assert corpus_tokens(tmp_path, Manifest.load(tmp_path)).tolist() == sorted(set(ids[~padding].tolist()) | {49407})
    assert 0 < sum(read) < 64 << 10
    read.clear()  # the loader reads every member, the images too
    assert len(list(loader.read_shards([loader.Shard(str(tmp_path / "shard-000000.tar"))], loader.Counter()))) == 3
    assert sum(read) > 3 * len(image)


def _shard(directory, damage):
    samples = [Sample(f"s{i:03d}", image=os.urandom(3000 + 700 * i), label=i % 3, meta={"captions": [f"word {i}"]})
               for i in range(12)]
    manifest = Manifest(dataset="t", split="train", modality="image", tasks=["image_caption"], source="t")
    write_shards(directory, samples, lambda sample: sample, manifest=manifest, min_shards=1, progress=False)
    tar = directory / "shard-000000.tar"
    with tarfile.open(tar) as archive:
        members = {m.name: m for m in archive.getmembers()}
    data = bytearray(tar.read_bytes())
    for name, where in damage:
        if where == "wipe":
            data[members[name].offset : members[name].offset + 512] = os.urandom(512)
        elif where == "unlisted":
            (directory / "shard-000000.json").unlink()
        elif where != "gzip":  # cut this many bytes into the member's data (negative: into its header)
            data = data[: members[name].offset_data + where]
    tar.write_bytes(gzip.compress(bytes(data)) if ("", "gzip") in damage else bytes(data))
    return tar


@pytest.mark.parametrize("damage", [
    [], [("", "gzip")], [("s005.jpg", "wipe"), ("s008.json", "wipe")], [("s009.jpg", 100)], [("s004.json", -400)],
    [("s006.jpg", "wipe"), ("", "unlisted")], [("s010.jpg", 3)], [("s002.cls", "wipe"), ("s011.jpg", 5000)],
])
def test_reading_only_the_texts_keeps_the_samples_and_the_counts(tmp_path, damage):
    shards = [loader.Shard(str(_shard(tmp_path, damage)), 12)]
    every, texts = loader.Counter(), loader.Counter()
    full = [{k: v for k, v in s.items() if k in ("__key__", "txt", "json")} for s in loader.read_shards(shards, every)]
    some = list(loader.read_shards(shards, texts, corpus.TEXT_MEMBERS))
    assert [{k: v for k, v in s.items() if k in ("__key__", "txt", "json")} for s in some] == full
    assert all(s["jpg"] == b"" for s in some) and texts == every
    assert damage == [] or damage == [("", "gzip")] or every  # each damage is seen
