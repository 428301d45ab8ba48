"""The shard writer: shards left empty by skipped items, and resuming around them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uniperceiver_cli.data.loader import make_loader
from uniperceiver_cli.data.shards import Manifest, Sample, Skip, write_shards

BAD_ROWS = {1, 4}


def _manifest() -> Manifest:
    return Manifest(dataset="rows", split="train", modality="text", tasks=["text_mlm"], source="test")


def test_shards_left_empty_by_skips_are_not_listed_and_resume_works(tmp_path: Path) -> None:
    made: list[int] = []

    def make(row: int) -> Sample:
        made.append(row)
        if row in BAD_ROWS:
            raise Skip("bad row", str(row))
        return Sample(f"r{row}", text=f"row number {row}")

    # 6 rows and 8 minimum shards: one row a shard, so the 2 bad rows would leave 2 shards empty.
    manifest = write_shards(tmp_path, range(6), make, manifest=_manifest(), progress=False)
    assert [(s.file, s.samples) for s in manifest.shards] == [
        ("shard-000000.tar", 1), ("shard-000002.tar", 1), ("shard-000003.tar", 1), ("shard-000005.tar", 1)]
    assert manifest.num_samples == 4 and manifest.skipped == {"bad row": 2}
    assert [e["detail"] for e in manifest.skipped_examples] == ["1", "4"]
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [s.file for s in manifest.shards]
    assert Manifest.load(tmp_path) == manifest
    stats = json.loads((tmp_path / "shard-000000.json").read_text())  # what the loader checks a shard against
    assert stats["keys"] == ["r0"] and stats["members"] == [["txt"]]

    made.clear()  # resuming a finished conversion converts nothing, the empty shards included
    assert write_shards(tmp_path, range(6), make, manifest=_manifest(), progress=False) == manifest
    assert made == []
    (tmp_path / "shard-000002.tar").unlink()
    assert write_shards(tmp_path, range(6), make, manifest=_manifest(), progress=False) == manifest
    assert made == [2]

    # 4 shards for 2 processes x 2 workers: each reader reads its own shard.
    keys = []
    for rank in range(2):
        loader = make_loader(tmp_path, task="text_mlm", train=False, batch_size=2, image_size=32, num_workers=2,
                             rank=rank, world_size=2)
        keys += [key for batch in loader for key in batch["keys"]]
        assert loader.skipped == {}
    assert sorted(keys) == ["r0", "r2", "r3", "r5"]


@pytest.mark.parametrize("content", ["[]", '"manifest"', "3"])
def test_a_manifest_that_is_not_a_json_object_is_one_line_naming_it(tmp_path: Path, content: str) -> None:
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ValueError, match=r"manifest\.json is not a valid shard manifest: not a JSON object") as error:
        Manifest.load(tmp_path)
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)
