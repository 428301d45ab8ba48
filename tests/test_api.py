"""The public Python API, end to end from raw files."""

import re

import pytest
import torch

import uniperceiver_cli as up
from uniperceiver_cli.model.preprocess import image_transform, load_image, video_transform


def test_raw_files_to_reference_predictions(reference_dir, ref_io):
    """Official weights + the fixture's raw images and label texts -> the reference's probabilities."""
    model = up.load_model(reference_dir / "ref_state.pt")
    raw = reference_dir / "raw"
    labels = (raw / "image_labels.txt").read_text().splitlines()
    preprocess = image_transform(model.config, task="classification")
    images = torch.stack([preprocess(load_image(raw / f)) for f in ref_io["image_cls"]["inputs"]["image_files"]])
    probs = model.classify(images, labels)
    expected = ref_io["image_cls"]["outputs"]["logits"].softmax(-1)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)

    video = ref_io["video_cls"]["inputs"]
    views = video_transform(model.config)(video["raw_frames_uint8"][0])  # (3 views, T, 3, S, S)
    probs = model.classify(views, video["label_texts"]).mean(0, keepdim=True)
    torch.testing.assert_close(probs, ref_io["video_cls"]["outputs"]["view_avg_probs"], atol=1e-5, rtol=0)


def test_features_are_normalised_and_shaped():
    torch.manual_seed(0)
    model = up.create_model("tiny", image_size=32).eval()
    with torch.no_grad():
        image = model.encode_image(torch.randn(2, 3, 32, 32))
        video = model.encode_video(torch.randn(2, 4, 3, 32, 32))
        text = model.encode_text(["a red circle", "two squares to the left of a star"])
    for feats in (image, video, text):
        assert feats.shape == (2, 64)
        torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2))
    probs = model.classify(torch.randn(3, 3, 32, 32), ["circle", "square", "star", "heart"])
    assert probs.shape == (3, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_wrong_input_shapes_fail_clearly():
    model = up.create_model("tiny", image_size=32)
    for call, shape, message in ((model.encode_image, (2, 32, 32), "expects (B, 3, H, W)"),
                                 (model.encode_video, (2, 3, 32, 32), "expects (B, T, 3, H, W)"),
                                 (model.encode_image, (1, 3, 64, 64), "64x64 but the model expects 32x32")):
        with pytest.raises(ValueError, match=re.escape(message)):
            call(torch.zeros(shape))
