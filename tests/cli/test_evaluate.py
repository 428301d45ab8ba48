"""``uniperceiver evaluate`` through the CLI: the reference fixture model on the fixture's raw files."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import uniperceiver_cli as up
from uniperceiver_cli.cli.app import app

# Its tests share module fixtures that take a while to make: one xdist worker runs them all (Makefile).
pytestmark = pytest.mark.xdist_group("evaluate-cli")

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
    none = runner.invoke(app, ["evaluate", *map(str, ["--model", reference_dir / "ref_state.pt", "--data",
                                                      shards / "imagenet" / "val", "--labels", tmp_path / "labels.txt",
                                                      "--out", tmp_path / "zs"])])
    assert none.exit_code == 2 and not (tmp_path / "zs").exists()  # no class of the split: nothing to score
    assert none.stderr.count("\n") == 1 and "none of the 3 labels (dog, cat, fish) is a class" in none.stderr
    (tmp_path / "some.txt").write_text("Tabby cat\ntench\nlobster\n")  # two of the three true classes
    some = _evaluate(["--model", reference_dir / "ref_state.pt", "--data", shards / "imagenet" / "val", "--labels",
                      tmp_path / "some.txt", "--templates", tmp_path / "templates.txt", "--out", tmp_path / "some"])
    results = json.loads((tmp_path / "some" / "results.json").read_text())
    assert results["settings"]["labels"] == ["Tabby cat", "tench", "lobster"]
    assert "2 of 3 samples" in results["notes"][0] and "acc@1" in results["metrics"]
    assert "warning: accuracy over the 2 of 3 samples" in some.stderr and some.stderr.count("\n") == 1
    bad = runner.invoke(app, ["evaluate", "--model", str(reference_dir / "ref_state.pt"), "--data",
                              str(shards / "imagenet" / "val"), "--task", "image_caption"])
    assert bad.exit_code == 2 and "serves image_classification, not image_caption" in bad.stderr


# ------------------------------------------------------------------ what a bundle records, and suspect bundles
CLASSES = ["tench", "goldfish", "great white shark", "Golden Retriever", "tabby cat"]  # the split's order
WORDS = ["a", "red", "circle", "dog", "on"]


def _tiny(**overrides):
    torch.manual_seed(0)
    return up.create_model("tiny", image_size=32, layer_scale_init=1.0, **overrides)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A prompt-tuned bundle whose classifier rows are named, in another order than the split's."""
    net = _tiny(prompt={"classifier_classes": 5})
    with torch.no_grad():  # a trained classifier: its logits decide
        net.head.fc_prompt.weight.normal_(0, 5.0)
    net.class_names = [CLASSES[i] for i in (4, 0, 3, 1, 2)]
    return up.save_bundle(net, tmp_path_factory.mktemp("tuned") / "bundle")


def _probs(out):
    return {row["key"]: {e["label"]: e["prob"] for e in row["top"]}
            for row in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}


def test_classifier_logits_follow_the_label_names(shards, tuned, tmp_path):
    data = shards / "imagenet" / "val"
    (tmp_path / "reordered.txt").write_text("\n".join(CLASSES[::-1]) + "\n")
    (tmp_path / "three.txt").write_text("tabby cat\ngoldfish\ntench\n")
    _evaluate(["--model", tuned, "--data", data, "--out", tmp_path / "split"])
    _evaluate(["--model", tuned, "--data", data, "--labels", tmp_path / "reordered.txt", "--out", tmp_path / "rev"])
    split, reordered = _probs(tmp_path / "split"), _probs(tmp_path / "rev")
    for key, probs in split.items():
        assert max(probs, key=probs.get) == max(reordered[key], key=reordered[key].get)
        assert reordered[key] == pytest.approx(probs, abs=2e-6)
    assert len({max(p, key=p.get) for p in split.values()}) > 1  # the classifier, not one constant answer
    _evaluate(["--model", tuned, "--data", data, "--labels", tmp_path / "three.txt", "--out", tmp_path / "three"])
    for key, probs in _probs(tmp_path / "three").items():  # the same logits, renormalised over the three
        total = sum(split[key][name] for name in probs)  # (of probabilities rounded to 6 decimals)
        assert probs == pytest.approx({name: split[key][name] / total for name in probs}, abs=1e-3)


def test_labels_the_classifier_has_no_logits_for_are_refused(shards, tuned, tmp_path):
    (tmp_path / "zebra.txt").write_text("tench\nzebra\ngoldfish\n")
    result = runner.invoke(app, ["evaluate", "--model", str(tuned), "--data", str(shards / "imagenet" / "val"),
                                 "--labels", str(tmp_path / "zebra.txt"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "error: the model's classifier prompt has no logits for 'zebra'" in result.stderr
    older = tmp_path / "older"  # a bundle from before class names were recorded scores by position only
    shutil.copytree(tuned, older)
    meta = json.loads((older / "config.json").read_text())
    del meta["targets"]
    (older / "config.json").write_text(json.dumps(meta))
    (tmp_path / "three.txt").write_text("tabby cat\ngoldfish\ntench\n")
    result = runner.invoke(app, ["evaluate", "--model", str(older), "--data", str(shards / "imagenet" / "val"),
                                 "--labels", str(tmp_path / "three.txt"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "records no class names" in result.stderr and result.stderr.count("\n") == 1
    _evaluate(["--model", older, "--data", shards / "imagenet" / "val", "--out", tmp_path / "positional"])


def _caption_words(out):
    return [row["caption"].split() for row in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())]


def test_captions_decode_over_the_recorded_vocabulary(shards, tmp_path):
    net = _tiny()
    tokenizer = up.get_tokenizer()
    net.caption_vocabulary = torch.tensor([tokenizer.encode(w, add_eot=False)[0] for w in WORDS])
    bundle = up.save_bundle(net, tmp_path / "bundle")
    args = ["--model", bundle, "--data", shards / "coco" / "test5k", "--task", "image_caption", "--max-len", "4"]
    _evaluate([*args, "--out", tmp_path / "trained"])
    trained = _caption_words(tmp_path / "trained")
    assert any(trained) and all(set(words) <= set(WORDS) for words in trained)
    _evaluate([*args, "--vocabulary", "full", "--out", tmp_path / "full"])
    assert not all(set(words) <= set(WORDS) for words in _caption_words(tmp_path / "full"))
    assert json.loads((tmp_path / "full" / "results.json").read_text())["settings"]["vocabulary"] == "full"
    _evaluate([*args, "--vocabulary-from", shards / "coco" / "test5k", "--out", tmp_path / "from"])
    result = runner.invoke(app, ["evaluate", *map(str, args), "--vocabulary", "full", "--vocabulary-from",
                                 str(shards / "coco" / "test5k")])
    assert result.exit_code == 2 and "contradict" in result.stderr


def test_invalid_config_is_one_line_and_non_finite_weights_warn(shards, tmp_path):
    bad = up.save_bundle(_tiny(), tmp_path / "bad")
    meta = json.loads((bad / "config.json").read_text())
    meta["model"]["width"] = -64
    (bad / "config.json").write_text(json.dumps(meta))
    args = ["--data", shards / "imagenet" / "val", "--out", tmp_path / "out"]
    result = runner.invoke(app, ["evaluate", "--model", str(bad), *map(str, args)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "error: cannot read" in result.stderr and "width must be a positive integer, got -64" in result.stderr
    net = _tiny()
    with torch.no_grad():
        net.head.proj.weight[0, 0] = float("nan")
    poisoned = up.save_bundle(net, tmp_path / "nan")
    result = _evaluate(["--model", poisoned, *args])
    assert result.stderr.count("\n") == 1 and "warning: checkpoint" in result.stderr
    assert f"1 of {len(net.state_dict())} tensors hold NaN or infinite values (head.proj.weight)" in result.stderr
