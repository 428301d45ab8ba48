"""``uniperceiver evaluate`` through the CLI: the reference fixture model on the fixture's raw files."""

import json

import pytest
import torch
from typer.testing import CliRunner

from uniperceiver_cli.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, reference_dir):
    out = tmp_path_factory.mktemp("fixture-shards")
    raw = reference_dir / "raw"
    for args in (["imagenet", raw / "imagenet", "--split", "val", "--class-names", raw / "image_labels.txt",
                  "--out", out / "imagenet"],
                 ["coco", raw / "coco" / "annotations" / "captions_test5k.json", "--images", raw / "coco" / "images",
                  "--out", out / "coco"]):
        result = runner.invoke(app, ["prepare-data", *map(str, args), "--no-progress", "--min-shards", "1"])
        assert result.exit_code == 0, result.output
    return out


def _evaluate(args):
    result = runner.invoke(app, ["evaluate", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def test_classification_reproduces_the_fixture(shards, reference_dir, ref_io, tmp_path):
    _evaluate(["--model", reference_dir / "ref_state.pt", "--data", shards / "imagenet" / "val",
               "--task", "image_classification", "--out", tmp_path, "--batch-size", "2"])
    results = json.loads((tmp_path / "results.json").read_text())
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    labels = ref_io["image_cls"]["inputs"]["label_texts"]
    expected = ref_io["image_cls"]["outputs"]
    probs = expected["logits"].softmax(-1)
    assert [p["top"][0]["label"] for p in predictions] == [labels[int(i)] for i in expected["pred"]]
    for row, p in zip(predictions, probs, strict=True):
        assert row["top"][0]["prob"] == pytest.approx(float(p.max()), abs=1e-5)
    accuracy = 100.0 * float((expected["pred"] == torch.tensor([3, 0, 4])).float().mean())
    assert results["metrics"]["acc@1"] == pytest.approx(accuracy)
    assert results["num_samples"] == 3 and results["data"]["split"] == "val"
    assert len(results["model"]["sha256"]) == 64


def test_captioning_reproduces_the_fixture_sentences(shards, reference_dir, ref_io, tmp_path):
    cap = ref_io["caption"]["outputs"]
    _evaluate(["--model", reference_dir / "ref_state.pt", "--data", shards / "coco" / "test5k",
               "--task", "image_caption", "--out", tmp_path, "--beam-size", str(cap["beam_size"]),
               "--max-len", str(cap["eval_max_seq_len"]), "--len-penalty", str(cap["len_penalty"])])
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == [s.strip() for s in cap["sentences"]]
    coco = json.loads((tmp_path / "captions_coco.json").read_text())
    assert [c["caption"] for c in coco] == [r["caption"] for r in rows]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"BLEU-4", "CIDEr", "METEOR", "ROUGE-L"} <= set(results["metrics"])
    assert any("SPICE" in note for note in results["notes"])


def test_retrieval_matches_the_fixture_similarities(shards, reference_dir, ref_io, tmp_path):
    _evaluate(["--model", reference_dir / "ref_state.pt", "--data", shards / "coco" / "test5k",
               "--task", "image_retrieval", "--out", tmp_path, "--max-text-len", "30"])
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    captions = ref_io["retrieval"]["inputs"]["captions"]
    best = ref_io["retrieval"]["outputs"]["sim_i2t"].argmax(1)
    assert [r["best_text"] for r in rows] == [captions[int(i)] for i in best]


def test_zero_shot_labels_and_bad_options(shards, reference_dir, tmp_path):
    (tmp_path / "labels.txt").write_text("dog\ncat\nfish\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na drawing of a {}.\n")
    _evaluate(["--model", reference_dir / "ref_state.pt", "--data", shards / "imagenet" / "val", "--labels",
               tmp_path / "labels.txt", "--templates", tmp_path / "templates.txt", "--out", tmp_path / "zs"])
    results = json.loads((tmp_path / "zs" / "results.json").read_text())
    assert results["settings"]["labels"] == ["dog", "cat", "fish"]
    assert results["metrics"] == {} and "not computed" in results["notes"][0]
    (tmp_path / "some.txt").write_text("Tabby cat\ntench\nlobster\n")  # two of the three true classes
    _evaluate(["--model", reference_dir / "ref_state.pt", "--data", shards / "imagenet" / "val", "--labels",
               tmp_path / "some.txt", "--out", tmp_path / "some"])
    results = json.loads((tmp_path / "some" / "results.json").read_text())
    assert "2 of 3 samples" in results["notes"][0] and "acc@1" in results["metrics"]
    bad = runner.invoke(app, ["evaluate", "--model", str(reference_dir / "ref_state.pt"), "--data",
                              str(shards / "imagenet" / "val"), "--task", "image_caption"])
    assert bad.exit_code == 2 and "serves image_classification, not image_caption" in bad.stderr
