"""``uniperceiver predict`` on image and mp4 files, with a corrupt file among them."""

import json
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import uniperceiver_cli as up
from uniperceiver_cli.cli.app import app

runner = CliRunner()


def _mp4(path, frames=6, size=64):  # decord mis-decodes widths below 64
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            image = np.zeros((size, size, 3), dtype=np.uint8)
            image[:, : 8 * (t + 1)] = (200, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def files(tmp_path_factory, reference_dir):
    root = tmp_path_factory.mktemp("predict")
    for i in range(2):
        shutil.copy(reference_dir / "raw" / "imagenet" / "val" / f"img_{i}.png", root / f"img_{i}.png")
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    _mp4(root / "clip.mp4")
    (root / "labels.txt").write_text("tench\ngoldfish\ngreat white shark\nGolden Retriever\ntabby cat\n")
    return root


def _invoke(args):
    result = runner.invoke(app, ["predict", *map(str, args)], env={"COLUMNS": "300"})  # a path in the table on one line
    return result, result.stdout


def test_labels_for_images_and_video_with_a_corrupt_file(files, reference_dir, ref_io):
    model = reference_dir / "ref_state.pt"
    result, out = _invoke([files / "img_0.png", files / "broken.jpg", files / "img_1.png", files / "clip.mp4",
                           "--model", model, "--labels", files / "labels.txt", "--top-k", "3", "--json"])
    assert result.exit_code == 1  # one file failed, the others were answered
    assert "cannot read image" in result.stderr and "broken.jpg" in result.stderr
    answers = json.loads(out)
    assert [a["file"].rsplit("/", 1)[1] for a in answers] == ["img_0.png", "img_1.png", "clip.mp4"]
    expected = ref_io["image_cls"]["outputs"]["logits"].softmax(-1)
    labels = (files / "labels.txt").read_text().splitlines()
    for row, probs in zip(answers[:2], expected[:2], strict=True):
        assert row["top"][0]["text"] == labels[int(probs.argmax())]
        assert row["top"][0]["prob"] == pytest.approx(float(probs.max()), abs=1e-5)
    assert len(answers[2]["top"]) == 3 and sum(e["prob"] for e in answers[2]["top"]) <= 1.0


def test_texts_and_captions(files, tmp_path):
    torch.manual_seed(0)
    up.save_bundle(up.create_model("tiny", image_size=32, layer_scale_init=1.0), tmp_path / "bundle")
    (tmp_path / "texts.txt").write_text("a red square\na blue circle\na green star\n")
    result, out = _invoke([files / "img_0.png", files / "clip.mp4", "--model", tmp_path / "bundle",
                           "--texts", tmp_path / "texts.txt", "--top-k", "2", "--json"])
    assert result.exit_code == 0, result.output
    answers = json.loads(out)
    assert all(len(a["top"]) == 2 and -1 <= a["top"][0]["similarity"] <= 1 for a in answers)
    result, out = _invoke([files, "--model", tmp_path / "bundle", "--caption", "--max-len", "3"])
    assert result.exit_code == 1  # the folder holds broken.jpg
    assert "img_1.png" in out and "clip.mp4" in out


def test_mode_must_be_chosen(files):
    result, _ = _invoke([files / "img_0.png", "--preset", "tiny"])
    assert result.exit_code == 2 and "choose exactly one of" in result.stderr
    result, _ = _invoke([files / "nothing.png", "--preset", "tiny", "--caption"])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def _tiny(**overrides):
    torch.manual_seed(0)
    return up.create_model("tiny", image_size=32, layer_scale_init=1.0, **overrides)


def test_classifier_labels_are_mapped_by_name(files, tmp_path):
    net = _tiny(prompt={"classifier_classes": 3})
    with torch.no_grad():  # a trained classifier: its logits decide
        net.head.fc_prompt.weight.normal_(0, 5.0)
    net.class_names = ["tench", "goldfish", "tabby cat"]
    bundle = up.save_bundle(net, tmp_path / "tuned")
    images = [files / "img_0.png", files / "img_1.png"]

    def probs(*names):
        result, out = _invoke([*images, "--model", bundle, *[a for n in names for a in ("--label", n)], "--json"])
        assert result.exit_code == 0, result.output
        return [{e["text"]: e["prob"] for e in row["top"]} for row in json.loads(out)]

    forward, backward = probs("tench", "goldfish", "tabby cat"), probs("tabby cat", "goldfish", "tench")
    for a, b in zip(forward, backward, strict=True):
        assert max(a, key=a.get) == max(b, key=b.get) and a == pytest.approx(b, abs=2e-6)
    assert len(probs("goldfish", "tench")[0]) == 2
    result, _ = _invoke([*images, "--model", bundle, "--label", "tench", "--label", "zebra"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "error: the model's classifier prompt has no logits for 'zebra'" in result.stderr


def test_captions_decode_over_the_recorded_vocabulary(files, tmp_path):
    net = _tiny()
    words = ["a", "red", "circle", "dog", "on"]
    net.caption_vocabulary = torch.tensor([up.get_tokenizer().encode(w, add_eot=False)[0] for w in words])
    bundle = up.save_bundle(net, tmp_path / "bundle")

    def captions(*extra):
        result, out = _invoke([files / "img_0.png", files / "img_1.png", "--model", bundle, "--caption",
                               "--max-len", "4", "--json", *extra])
        assert result.exit_code == 0, result.output
        return [row["caption"].split() for row in json.loads(out)]

    trained = captions()
    assert any(trained) and all(set(c) <= set(words) for c in trained)
    assert not all(set(c) <= set(words) for c in captions("--vocabulary", "full"))
    result, _ = _invoke([files / "img_0.png", "--model", bundle, "--caption", "--vocabulary", "most"])
    assert result.exit_code == 2 and "'most' is not one of" in " ".join(result.stderr.split())
    result, _ = _invoke([files / "img_0.png", "--model", bundle, "--label", "cat", "--vocabulary", "most"])
    assert result.exit_code == 2 and "'most' is not one of" in " ".join(result.stderr.split())  # in every mode


def test_invalid_config_is_one_line_and_non_finite_weights_warn(files, tmp_path):
    bad = up.save_bundle(_tiny(), tmp_path / "bad")
    meta = json.loads((bad / "config.json").read_text())
    meta["model"]["width"] = -64
    (bad / "config.json").write_text(json.dumps(meta))
    result, _ = _invoke([files / "img_0.png", "--model", bad, "--label", "cat", "--label", "dog"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "width must be a positive integer, got -64" in result.stderr
    net = _tiny()
    with torch.no_grad():
        net.blocks[0].mlp.fc1.bias[3] = float("inf")
    poisoned = up.save_bundle(net, tmp_path / "inf")
    result, out = _invoke([files / "img_0.png", "--model", poisoned, "--label", "cat", "--label", "dog", "--json"])
    assert result.exit_code == 0 and len(json.loads(out)) == 1
    assert result.stderr.count("\n") == 1 and "warning: checkpoint" in result.stderr
    assert "1 of" in result.stderr and "blocks.0.mlp.fc1.bias" in result.stderr


def test_the_module_does_not_import_torch():
    code = ("import sys, uniperceiver_cli.cli.predict, uniperceiver_cli.cli.evaluate; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    torch.manual_seed(0)
    return up.save_bundle(up.create_model("tiny", image_size=32, layer_scale_init=1.0),
                          tmp_path_factory.mktemp("tiny") / "bundle")


def _jsonl(text):
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("mode", [["--label", "a red square", "--label", "a dog", "--label", "a star"],
                                  ["--texts", "TEXTS"], ["--caption", "--max-len", "4"],
                                  ["--question", "what colour is it?", "--label", "red", "--label", "blue",
                                   "--label", "two"]])
def test_batch_1_and_batch_16_give_the_same_answers(files, tiny_bundle, tmp_path, mode):
    (tmp_path / "texts.txt").write_text("a red square\na blue circle\na green star\n")
    mode = [str(tmp_path / "texts.txt") if a == "TEXTS" else a for a in mode]
    rng = np.random.default_rng(0)
    from PIL import Image
    for i in range(14):
        Image.fromarray(rng.integers(0, 256, (24 + i, 40, 3), dtype=np.uint8)).save(tmp_path / f"r{i:02d}.png")
    inputs = [*sorted(tmp_path.glob("r*.png"))[:7], files / "clip.mp4", files / "broken.jpg",
              *sorted(tmp_path.glob("r*.png"))[7:], files / "clip.mp4"]
    runs = {}
    for size in (1, 16):
        result, out = _invoke([*inputs, "--model", tiny_bundle, *mode, "--batch-size", size, "--jsonl"])
        assert result.exit_code == 1  # broken.jpg
        runs[size] = _jsonl(out)
    assert [r["file"] for r in runs[1]] == [r["file"] for r in runs[16]] == [str(p) for p in inputs]
    assert "cannot read image" in runs[16][8]["error"] and runs[1][8] == runs[16][8]
    for one, sixteen in zip(runs[1], runs[16], strict=True):
        if "top" in one:
            assert [e["text"] for e in one["top"]] == [e["text"] for e in sixteen["top"]]
            key = next(k for k in one["top"][0] if k != "text")
            assert [e[key] for e in one["top"]] == pytest.approx([e[key] for e in sixteen["top"]], abs=1e-5)
        else:
            assert one == sixteen


def test_500_images_stream_through_a_pipe(files, tiny_bundle, tmp_path):
    """Paths on stdin, one JSON line per file out as each batch is done: the first batch's lines arrive before
    the rest of the list is written."""
    import select

    paths = []
    for i in range(500):
        path = tmp_path / f"img_{i:03d}.png"
        path.write_bytes((files / f"img_{i % 2}.png").read_bytes())
        paths.append(path)
    paths[250] = tmp_path / "missing.png"
    process = subprocess.Popen([sys.executable, "-m", "uniperceiver_cli", "predict", "-", "--model", str(tiny_bundle),
                                "--label", "tench", "--label", "goldfish", "--jsonl", "--batch-size", "20"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdin.write("".join(f"{p}\n" for p in paths[:20]))
    process.stdin.flush()
    ready, _, _ = select.select([process.stdout], [], [], 120)
    assert ready, "no line came back for the first batch while the list was still open"
    first = process.stdout.readline()
    process.stdin.write("".join(f"{p}\n" for p in paths[20:]))
    process.stdin.close()
    rest, stderr = process.stdout.read(), process.stderr.read()
    assert process.wait() == 1, stderr[-2000:]  # the missing file
    rows = _jsonl(first + rest)
    assert [r["file"] for r in rows] == [str(p) for p in paths]
    assert rows[250]["error"].endswith("missing.png': no such file")
    answers = [r for r in rows if "top" in r]
    assert len(answers) == 499
    assert {r["top"][0]["text"] for r in answers[::2]} <= {"tench", "goldfish"}
    assert rows[0]["top"] == rows[2]["top"]  # the same image, in another batch position


def test_out_writes_a_new_file_from_a_list(files, tiny_bundle, tmp_path):
    (tmp_path / "list.txt").write_text(f"{files / 'img_0.png'}\n{files / 'broken.jpg'}\n\n{files / 'clip.mp4'}\n")
    out = tmp_path / "answers.jsonl"
    result, stdout = _invoke(["--files-from", tmp_path / "list.txt", "--model", tiny_bundle, "--caption",
                              "--max-len", "3", "--out", out])
    assert result.exit_code == 1 and stdout == ""
    rows = _jsonl(out.read_text())
    assert [r["file"].rsplit("/", 1)[1] for r in rows] == ["img_0.png", "broken.jpg", "clip.mp4"]
    assert "error" in rows[1] and "caption" in rows[0] and "caption" in rows[2]
    before = out.read_text()
    result, _ = _invoke([files / "img_0.png", "--model", tiny_bundle, "--caption", "--out", out])
    assert result.exit_code == 2 and "exists; give a new file for --out" in result.stderr
    assert out.read_text() == before
    result, _ = _invoke([files / "img_0.png", "--model", tiny_bundle, "--caption", "--out", out, "--json"])
    assert result.exit_code == 2 and "choose one of --json, --jsonl or --out" in result.stderr


def test_progress_on_a_terminal(files, tiny_bundle, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    result, out = _invoke([files / "img_0.png", files / "img_1.png", files / "clip.mp4", "--model", tiny_bundle,
                           "--label", "a", "--label", "b", "--jsonl", "--batch-size", "2"])
    assert result.exit_code == 0 and len(out.splitlines()) == 3
    assert "predict" in result.stderr and "3/3" in result.stderr


def test_out_is_not_created_when_nothing_is_answered(tiny_bundle, tmp_path):
    out = tmp_path / "answers.jsonl"
    result = runner.invoke(app, ["predict", "-", "--model", str(tiny_bundle), "--caption", "--out", str(out)], input="")
    assert result.exit_code == 2 and "no image or video files were given" in result.stderr
    assert not out.exists()  # so the same command can run again


def test_questions_about_images(files, tiny_bundle):
    from PIL import Image

    from uniperceiver_cli.model.preprocess import image_transform

    answers = ["red", "blue", "two dogs"]
    result, out = _invoke([files / "img_0.png", files / "clip.mp4", "--model", tiny_bundle, "--question",
                           "what is on the left?", *[a for answer in answers for a in ("--label", answer)], "--jsonl"])
    assert result.exit_code == 1  # the clip: questions are about images
    rows = _jsonl(out)
    assert rows[1] == {"file": str(files / "clip.mp4"),
                       "error": f"{files / 'clip.mp4'}: visual question answering takes images, not videos"}
    net = up.load_model(tiny_bundle)
    pixels = image_transform(net.config, "vqa")(Image.open(files / "img_0.png").convert("RGB"))[None]
    expected = net.answer(pixels, "what is on the left?", answers)[0]
    got = {e["text"]: e["prob"] for e in rows[0]["top"]}
    assert got == pytest.approx(dict(zip(answers, expected.tolist(), strict=True)), abs=1e-5)
    result, _ = _invoke([files / "img_0.png", "--model", tiny_bundle, "--question", "what?"])
    assert result.exit_code == 2 and "choose among the --labels/--label entries" in result.stderr


def test_sentences_are_classified_at_their_slot(files, tiny_bundle, tmp_path):
    prompts = ["if a red circle is above a blue star, is the star below it? <|spe|>", "a gripping film. It is <|spe|>."]
    (tmp_path / "sentences.txt").write_text(prompts[1] + "\nno slot here\na film.<|spe|>\n")  # glued: no slot
    result, out = _invoke(["--sentence", prompts[0], "--sentences", tmp_path / "sentences.txt", "--model", tiny_bundle,
                           "--label", "no", "--label", "yes", "--jsonl"])
    assert result.exit_code == 1  # the sentence without a slot
    rows = _jsonl(out)
    assert [r["sentence"] for r in rows] == [*prompts, "no slot here", "a film.<|spe|>"]
    assert all("no <|spe|> slot" in row["error"] for row in rows[2:])
    expected = up.load_model(tiny_bundle).classify_text(prompts, ["no", "yes"])
    for row, probs in zip(rows[:2], expected, strict=True):
        assert {e["text"]: e["prob"] for e in row["top"]} == pytest.approx(
            dict(zip(["no", "yes"], probs.tolist(), strict=True)), abs=1e-5)
    result, out = _invoke(["--sentence", prompts[1], "--model", tiny_bundle, "--label", "no", "--label", "yes"])
    assert result.exit_code == 0 and "gripping" in out and "sentence" in out  # the table
    result, _ = _invoke([files / "img_0.png", "--sentence", prompts[1], "--preset", "tiny", "--label", "no"])
    assert result.exit_code == 2 and "give no files with them" in result.stderr
    result, _ = _invoke(["--sentence", prompts[1], "--preset", "tiny", "--label", "counterintuitively"])
    assert result.exit_code == 2 and "must be one token" in result.stderr
