"""Evaluation runners on tiny models and hand-made batches."""

import pytest
import torch

import uniperceiver_cli as up
from uniperceiver_cli.evaluate.metrics import topk_accuracy
from uniperceiver_cli.evaluate.runners import (
    label_features,
    limited,
    mask_tokens,
    run_captioning,
    run_classification,
    run_mlm,
    run_retrieval,
)
from uniperceiver_cli.evaluate.tasks import with_progress
from uniperceiver_cli.model.decoding import beam_search
from uniperceiver_cli.model.tokenizer import _bytes_to_unicode, get_tokenizer

SIZE = 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return up.create_model("tiny", image_size=SIZE, layer_scale_init=1.0).eval()  # outputs depend on inputs


def _image_batches(n=6, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        out.append({"images": torch.randn(b, 3, SIZE, SIZE, generator=g), "labels": torch.arange(start, start + b) % 3,
                    "keys": [f"k{start + i}" for i in range(b)],
                    "captions": [[f"a red circle number {start + i}", "a shape"] for i in range(b)]})
    return out


def test_label_features_average_templates(model):
    names = ["circle", "square"]
    plain = label_features(model, names)
    torch.testing.assert_close(plain, model.encode_text(names))
    templated = label_features(model, names, ["a photo of a {}.", "a drawing of a {}."])
    expected = torch.nn.functional.normalize(
        model.encode_text(["a photo of a circle.", "a photo of a square."])
        + model.encode_text(["a drawing of a circle.", "a drawing of a square."]), dim=-1)
    torch.testing.assert_close(templated, expected)
    with pytest.raises(ValueError, match="has no"):
        label_features(model, names, ["a photo"])


def test_classification_runner_matches_classify(model):
    names = ["circle", "square", "star"]
    batches = _image_batches()
    result = run_classification(model, batches, names, top_k=2)
    probs = torch.cat([model.classify(b["images"], names) for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert result.metrics == pytest.approx(topk_accuracy(probs, labels, ks=(1, 2)))
    assert result.num_samples == 6 and result.predictions[0]["key"] == "k0"
    assert result.predictions[0]["top"][0]["label"] == names[int(probs[0].argmax())]


def test_video_views_are_averaged(model):
    names = ["left", "right"]
    g = torch.Generator().manual_seed(3)
    views = torch.randn(2 * 3, 2, 3, SIZE, SIZE, generator=g)  # 2 videos x 3 views
    batch = {"videos": views, "num_views": 3, "labels": torch.tensor([0, 1]), "keys": ["v0", "v1"]}
    result = run_classification(model, [batch], names, top_k=1)
    probs = model.classify(views, names).view(2, 3, 2).mean(1)
    assert result.predictions[1]["top"][0]["prob"] == pytest.approx(float(probs[1].max()), abs=1e-6)


def test_retrieval_runner_counts_every_caption(model):
    result = run_retrieval(model, _image_batches())
    assert result.num_samples == 6
    assert set(result.metrics) >= {"i2t_R@1", "t2i_R@10", "mean"}
    assert result.metrics["i2t_R@10"] == 100.0  # 12 captions: any item's 2 captions are within 10


def test_captioning_runner_writes_every_sample(model):
    result = run_captioning(model, _image_batches(n=3), beam_size=2, max_len=3)
    assert [p["key"] for p in result.predictions] == ["k0", "k1", "k2"]
    assert all(isinstance(p["caption"], str) for p in result.predictions)
    assert {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} <= set(result.metrics)
    assert "SPICE" in result.notes[0]


def test_mlm_masking_and_runner(model):
    ids = torch.tensor([[320, 1929, 269, 49407, 0], [320, 49407, 0, 0, 0]])
    padding = ids == 0
    masked, chosen = mask_tokens(ids, padding, 0.0, 0, ["a", "b"])
    assert chosen.sum(1).tolist() == [1, 1] and (masked[chosen] == 49410).all()
    masked, chosen = mask_tokens(ids, padding, 1.0, 0, ["a", "b"])
    assert chosen.tolist() == [[True, True, True, False, False], [True, False, False, False, False]]
    # a row's draws follow its key, whatever the batch it comes in and however far that batch is padded
    long = torch.tensor([[320 + i for i in range(40)]])
    _, alone = mask_tokens(long, None, 0.5, 7, ["k"])
    padded = torch.cat([torch.cat([long.flip(1), long], dim=1), torch.cat([long, torch.zeros_like(long)], dim=1)])
    _, paired = mask_tokens(padded, padded == 0, 0.5, 7, ["j", "k"])
    assert torch.equal(alone[0], paired[1, :40]) and not paired[1, 40:].any()
    assert not torch.equal(paired[0, :40], paired[1, :40]) and 10 < int(alone.sum()) < 30  # about half of 40
    result = run_mlm(model, [{"text_ids": ids, "text_padding": padding, "keys": ["a", "b"]}])
    assert result.metrics["masked_tokens"] >= 2 and 0 <= result.metrics["masked_acc"] <= 100


def test_mlm_over_a_restricted_vocabulary_maps_rows_back_to_token_ids(model, monkeypatch):
    ids = torch.tensor([[320, 1929, 269, 49407], [320, 49407, 0, 0]])
    padding = ids == 0
    batch = [{"text_ids": ids, "text_padding": padding, "keys": ["a", "b"]}]
    vocabulary, row_ids = model.caption_targets(torch.tensor([320]))
    assert row_ids.tolist() == [320, 49407]  # the candidates: token 320 (row 0) and end-of-text (row 1)
    # probability 0 masks one token per row, the first: 320 in both. Scores that pick row 0 are right only once
    # row 0 is read as token 320; scores that pick row 1 (end-of-text) are wrong.
    for row, accuracy in ((0, 100.0), (1, 0.0)):
        scores = torch.zeros(2, 2)
        scores[:, row] = 1.0
        monkeypatch.setattr(model, "mlm_logits", lambda *args, scores=scores: scores)
        result = run_mlm(model, batch, probability=0.0, vocab_ids=torch.tensor([320]))
        assert result.metrics["masked_acc"] == accuracy and result.metrics["masked_tokens"] == 2


def test_limited_stops_after_enough_samples():
    batches = _image_batches(n=10, batch=4)
    assert len(list(limited(batches, 5))) == 2 and len(list(limited(batches, None))) == 3


def test_captions_carry_no_replacement_characters(model):
    order = list(_bytes_to_unicode())  # token i (i < 256) is the byte order[i]
    partial = torch.tensor([i for i, byte in enumerate(order) if byte >= 0x80])  # no one is a whole character
    batches = _image_batches(n=3)
    vocabulary, token_ids = model.caption_targets(partial)
    tokens = beam_search(model, batches[0]["images"], max_len=6, vocabulary=vocabulary, token_ids=token_ids).tokens
    assert any("\ufffd" in text for text in get_tokenizer().decode_batch(tokens))  # the reference's decoding
    captions = [p["caption"] for p in run_captioning(model, batches, max_len=6, vocab_ids=partial).predictions]
    assert len(captions) == 3 and not any("\ufffd" in c for c in captions)
    model.caption_vocabulary = partial
    try:
        assert not any("\ufffd" in c for c in model.caption(batches[0]["images"], max_len=6))
    finally:
        model.caption_vocabulary = None


def test_labels_naming_no_class_of_the_data_are_refused(model):
    with pytest.raises(ValueError, match=r"none of the 2 labels \(dog, cat\) is a class of the data"):
        run_classification(model, _image_batches(), ["dog", "cat"], truth_names=["circle", "square", "star"])
    with pytest.raises(ValueError, match="none of the 6 evaluated samples is of a class among the 1 labels"):
        run_classification(model, _image_batches(), ["hexagon"], truth_names=["circle", "square", "star", "hexagon"])
    with pytest.warns(UserWarning, match="accuracy over the 4 of 6 samples"):
        result = run_classification(model, _image_batches(), ["Circle", "star"],
                                    truth_names=["circle", "square", "star"])
    assert "acc@1" in result.metrics


def test_progress_shows_samples_and_time_on_a_terminal_only(monkeypatch, capsys):
    batches = _image_batches(n=10, batch=4)
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich takes stderr for a terminal
    assert list(with_progress(batches, 10, "shape_classification")) == batches
    shown = capsys.readouterr().err
    assert "shape_classification" in shown and "10/10" in shown and "0:00:00" in shown
    monkeypatch.setenv("TTY_COMPATIBLE", "0")  # a log file: nothing written into it
    assert list(with_progress(batches, 10, "shape_classification")) == batches
    assert capsys.readouterr().err == ""
