"""Models by name: released checkpoints found in the models folder and checked against their hash, hf-hub: bundles
from a planted Hugging Face cache, and load_model_and_transforms."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import uniperceiver_cli as up
from uniperceiver_cli.checkpoints import pretrained
from uniperceiver_cli.checkpoints.pretrained import Pretrained
from uniperceiver_cli.cli.app import app
from uniperceiver_cli.model.config import PRESETS
from uniperceiver_cli.model.preprocess import image_transform, video_transform


def test_the_four_released_models_are_listed():
    assert up.list_pretrained() == ["uni-perceiver-base", "uni-perceiver-moe-base", "uni-perceiver-large",
                                    "uni-perceiver-moe-large"]
    assert all(entry.preset in PRESETS for entry in pretrained.PRETRAINED)
    assert pretrained.PRETRAINED[0].files[0] == "uni-perceiver-base-L12-H768-224size-torch-pretrained.pth"


@pytest.fixture
def released(tmp_path, monkeypatch, reference_dir):
    """The reference's tiny dense state dict, released under a name with its sha256, in a planted models folder."""
    folder = tmp_path / "models"
    folder.mkdir()
    data = (reference_dir / "ref_state.pt").read_bytes()
    (folder / "tiny-release.pth").write_bytes(data)
    entry = Pretrained("uni-perceiver-tiny", "tiny", "1M", ("tiny-release.pth",), "torch", "https://example.invalid",
                       hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(pretrained, "PRETRAINED", (*pretrained.PRETRAINED, entry))
    monkeypatch.setenv(pretrained.MODELS_ENV, str(folder))
    monkeypatch.chdir(tmp_path)
    return folder / "tiny-release.pth"


def test_a_released_name_loads_its_downloaded_file_with_the_references_numerics(released, reference_dir, ref_io):
    model = up.load_model("uni-perceiver-tiny")
    by_path = up.load_model(reference_dir / "ref_state.pt")
    for key, value in by_path.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    inputs = ref_io["image_cls"]["inputs"]
    labels = (reference_dir / "raw" / "image_labels.txt").read_text().splitlines()
    preprocess = image_transform(model.config, task="classification")
    images = torch.stack([preprocess(Image.open(reference_dir / "raw" / f).convert("RGB"))
                          for f in inputs["image_files"]])
    torch.testing.assert_close(model.classify(images, labels), ref_io["image_cls"]["outputs"]["logits"].softmax(-1),
                               atol=1e-5, rtol=0)
    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["uni-perceiver-tiny"]["found"] == str(released)
    assert rows["uni-perceiver-base"]["found"] is None
    assert rows["uni-perceiver-base"]["files"][-1] == "uni-perceiver-base.pth"


def test_a_corrupted_download_fails_its_hash_in_one_line(released):
    data = bytearray(released.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: torch would still read the file
    released.write_bytes(bytes(data))
    with pytest.raises(up.CheckpointError, match=r"is not the released uni-perceiver-tiny: its sha256 is .* \(a "
                                                 r"partial or corrupted download\)") as info:
        up.load_model("uni-perceiver-tiny")
    assert "\n" not in str(info.value)


def test_a_missing_download_says_where_to_get_it(released, monkeypatch):
    released.unlink()
    result = CliRunner().invoke(app, ["predict", "--model", "uni-perceiver-tiny", "--caption", str(released.parent)])
    assert result.exit_code == 2
    # no image in the folder is reported first; the model is looked up once files are found
    (released.parent / "a.png").write_bytes(b"")
    result = CliRunner().invoke(app, ["predict", "--model", "uni-perceiver-tiny", "--caption", str(released.parent)])
    assert result.exit_code == 2
    assert "uni-perceiver-tiny is not downloaded: download it from https://example.invalid and save it in" \
        in " ".join(result.output.split())


def test_a_local_path_named_like_a_released_model_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = up.create_model("tiny", image_size=32).eval()
    up.save_bundle(model, tmp_path / "uni-perceiver-base")
    assert up.load_model("uni-perceiver-base").config == model.config


def _plant_hub(cache, repo: str, model) -> None:
    """A bundle as huggingface_hub caches a download: refs/main names the snapshot holding the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    up.save_bundle(model, folder / "snapshots" / commit)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hf_hub_bundles_load_from_the_cache_offline(hub):
    torch.manual_seed(0)
    model = up.create_model("tiny", image_size=32).eval()
    model.class_names = None
    _plant_hub(hub, "someone/tiny-up", model)
    loaded = up.load_model("hf-hub:someone/tiny-up")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(up.CheckpointError, match=r"hf-hub:someone/absent is not in the Hugging Face cache"):
        up.load_model("hf-hub:someone/absent")
    with pytest.raises(up.CheckpointError, match=r"give hf-hub:ORG/NAME"):
        up.load_model("hf-hub:../../etc")
    weights = next(hub.glob("models--someone--tiny-up/snapshots/*/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    with pytest.raises(up.CheckpointError, match=r"model.safetensors: truncated or corrupt") as info:
        up.load_model("hf-hub:someone/tiny-up")
    assert "\n" not in str(info.value)


def test_load_model_and_transforms_equals_building_them_by_hand(tmp_path, hub):
    torch.manual_seed(0)
    model = up.create_model("tiny", image_size=32).eval()
    _plant_hub(hub, "someone/tiny-up", model)
    loaded, image_tf, video_tf, tokenizer = up.load_model_and_transforms("hf-hub:someone/tiny-up", task="caption")
    assert loaded.config == model.config and tokenizer is up.get_tokenizer()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 57, 3), dtype=np.uint8))
    assert torch.equal(image_tf(image), image_transform(model.config, "caption")(image))
    frames = torch.from_numpy(rng.integers(0, 256, (4, 36, 48, 3), dtype=np.uint8))
    assert torch.equal(video_tf(frames), video_transform(model.config)(frames))

    bundle = tmp_path / "edited"
    shutil.copytree(hub / "models--someone--tiny-up" / "snapshots" / "0123456789abcdef0123456789abcdef01234567",
                    bundle)
    meta = json.loads((bundle / "config.json").read_text())
    meta["preprocessing"]["image_mean"] = [0.5, 0.5, 0.5]
    (bundle / "config.json").write_text(json.dumps(meta))
    with pytest.raises(up.CheckpointError, match=r"records preprocessing this version does not build .*image_mean"):
        up.load_model_and_transforms(bundle)
