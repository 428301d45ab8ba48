"""``export --onnx`` and the torch-free runtime: graphs equal PyTorch, the reference fixtures' labels and caption
tokens come out of onnxruntime, MoE folding changes nothing, and bad input is one line with nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from uniperceiver_cli.checkpoints.errors import CheckpointError
from uniperceiver_cli.checkpoints.loading import load_model
from uniperceiver_cli.cli.app import app
from uniperceiver_cli.export import export
from uniperceiver_cli.model.config import get_config
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.onnx import export as onnx_export
from uniperceiver_cli.onnx.runtime import GRAPHS, MANIFEST, TASK_GRAPHS, OnnxModel, OnnxModelError

# Its tests share module fixtures that take a while to make: one xdist worker runs them all (Makefile).
pytestmark = pytest.mark.xdist_group("onnx")

REPO = Path(__file__).resolve().parents[1]
FEATS = {"atol": 1e-5, "rtol": 0}
LOGITS = {"atol": 1e-4, "rtol": 1e-5}


@pytest.fixture(scope="module", params=["dense", "moe"])
def exported(request, reference_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """An official fixture exported with its ONNX graphs (the whole vocabulary as the caption target set)."""
    variant = request.param
    state = reference_dir / ("ref_state.pt" if variant == "dense" else "ref_moe_state.pt")
    io = torch.load(reference_dir / ("ref_io.pt" if variant == "dense" else "ref_moe_io.pt"), map_location="cpu",
                    weights_only=True)
    out = tmp_path_factory.mktemp(f"onnx-{variant}") / "bundle"
    done = export(state, out, onnx=True)
    return variant, done, OnnxModel(out / "onnx"), io


def test_every_graph_is_validated_and_recorded(exported):
    variant, done, runtime, _ = exported
    task_graphs = TASK_GRAPHS if variant == "dense" else TASK_GRAPHS[:2]  # no VQA graph for an MoE model
    assert [g.name for g in done.graphs] == [*GRAPHS, *task_graphs]
    assert all(0 <= g.max_abs_error <= 1e-4 for g in done.graphs)
    manifest = json.loads((done.out / "onnx" / MANIFEST).read_text())
    assert manifest["validation"] == {g.name: g.max_abs_error for g in done.graphs}
    assert manifest["caption_token_ids"] is None and manifest["provenance"]["kind"] == "official"
    # An MoE graph is traced from the dense view of its attribute row: it holds a dense model's weights at most
    # (the visual graphs hold the embedded <|spe|> instead of the word table).
    import onnx

    dense = UniPerceiver(get_config("tiny")).num_parameters()  # the fixtures' shape
    word_table = 49411 * 64
    for name in (*GRAPHS, *task_graphs):
        graph = onnx.load(str(done.out / "onnx" / f"{name}.onnx"))
        held = sum(int(np.prod(init.dims)) for init in graph.graph.initializer)
        # + the caption target set's features; the VQA graph, the only one with the word table and the visual
        # embedding, + the spatial sin-cos table (a buffer, not a parameter: 14 x 14 positions of 64)
        limit = dense + {"caption_step": 49411 * 64, "vqa_encoder": 14 * 14 * 64}.get(name, 0)
        texts = ("text_encoder", "caption_step", "word_encoder", "cloze_encoder", "vqa_encoder")
        assert held <= limit and (name in texts or held < dense - word_table + 10**5)


def test_text_classification_and_vqa_through_onnxruntime(exported, files: Path):
    variant, done, runtime, _ = exported
    model = load_model(done.out)
    prompts = ["if a red circle is above a blue star, is the star below it? <|spe|>", "a fine film. It is <|spe|>."]
    with torch.inference_mode():
        expected = model.classify_text(prompts, ["no", "yes"])
    np.testing.assert_allclose(runtime.classify_text(prompts, ["no", "yes"]), expected.numpy(), **FEATS)
    from PIL import Image

    from uniperceiver_cli.model.pixels import image_array

    image = image_array(Image.open(files / "img_0.png"), runtime.manifest.image_size, "vqa")[None]
    answers = ["red", "two dogs", "left"]
    if variant == "moe":
        with pytest.raises(OnnxModelError, match="has no vqa_encoder.onnx: its model is a mixture of experts"):
            runtime.answer(image, "what colour is it?", answers)
        return
    with torch.inference_mode():
        expected = model.answer(torch.from_numpy(image), "what colour is it?", answers)
    np.testing.assert_allclose(runtime.answer(np.repeat(image, 2, axis=0), "what colour is it?", answers),
                               np.repeat(expected.numpy(), 2, axis=0), **FEATS)
    older = [done.out / "onnx" / f"{graph}.onnx" for graph in TASK_GRAPHS]
    for path in older:  # as a folder exported before the task graphs
        path.rename(path.with_suffix(".bak"))
    try:
        old = OnnxModel(done.out / "onnx")
        with pytest.raises(OnnxModelError, match="no word_encoder.onnx: it was exported before that graph existed"):
            old.classify_text(prompts, ["no", "yes"])
        with pytest.raises(OnnxModelError, match="no vqa_encoder.onnx: it was exported before that graph existed"):
            old.answer(image, "what colour is it?", answers)
    finally:
        for path in older:
            path.with_suffix(".bak").rename(path)


def test_fixture_classification_and_retrieval_through_onnxruntime(exported):
    _, _, runtime, io = exported
    cls = io["image_cls"]
    target_set = cls["inputs"]["shared_target_sets"]["ImageNet1k"]
    targets = runtime.encode_tokens(target_set["data"].numpy(), target_set["invalid_mask"].bool().numpy())
    logits = runtime.classification_logits(cls["inputs"]["input_sample_list"][0]["data"].numpy(), targets)
    torch.testing.assert_close(torch.from_numpy(logits), cls["outputs"]["logits"], **LOGITS)
    assert np.array_equal(logits.argmax(-1), cls["outputs"]["pred"].numpy())

    video = io["video_cls"]
    target_set = video["inputs"]["shared_target_sets"]["Kinetics400"]
    targets = runtime.encode_tokens(target_set["data"].numpy(), target_set["invalid_mask"].bool().numpy())
    logits = runtime.classification_logits(video["inputs"]["input_sample_list"][0]["data"].numpy(), targets)
    torch.testing.assert_close(torch.from_numpy(logits), video["outputs"]["logits"], **LOGITS)

    ret = io["retrieval"]
    images = runtime.encode_visual(ret["inputs"]["input_sample_list"][0]["data"].numpy())
    captions = ret["inputs"]["target_sample_list"][0]
    texts = runtime.encode_tokens(captions["data"].numpy(), captions["invalid_mask"].bool().numpy())
    torch.testing.assert_close(torch.from_numpy(images), ret["outputs"]["image_feats"], **FEATS)
    torch.testing.assert_close(torch.from_numpy(texts), ret["outputs"]["text_feats"], **FEATS)


def test_fixture_caption_tokens_through_onnxruntime(exported):
    _, _, runtime, io = exported
    expected = io["caption"]["outputs"]
    images = io["caption"]["inputs"]["input_sample_list"][0]["data"].numpy()
    tokens = runtime.caption_tokens(images, beam_size=expected["beam_size"], max_len=expected["eval_max_seq_len"],
                                    len_penalty=expected["len_penalty"])
    assert np.array_equal(tokens, expected["G_SENTS_IDS"].numpy())


def test_runtime_runs_without_torch(exported, tmp_path: Path):
    """The core path (tokenizer, pixels, onnxruntime) in a process where importing torch fails."""
    variant, done, runtime, io = exported
    images = io["caption"]["inputs"]["input_sample_list"][0]["data"].numpy()[:2]
    np.save(tmp_path / "images.npy", images)
    names = ["a red square", "a blue circle", "two dogs"]
    want = {"probs": runtime.classify(images, names).tolist(), "captions": runtime.caption(images, max_len=6)}
    script = f"""
import json, sys
sys.modules["torch"] = None
import numpy as np
from uniperceiver_cli.onnx.runtime import OnnxModel
model = OnnxModel({str(done.out / "onnx")!r})
images = np.load({str(tmp_path / "images.npy")!r})
print(json.dumps({{"probs": model.classify(images, {names!r}).tolist(), "captions": model.caption(images, max_len=6),
                  "torch": "torch" in sys.modules and sys.modules["torch"] is not None}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert got["torch"] is False and got["captions"] == want["captions"]
    np.testing.assert_allclose(got["probs"], want["probs"], atol=1e-6)


runner = CliRunner()


def _predict(*args) -> tuple[int, list[dict] | None, str]:
    result = runner.invoke(app, ["predict", *map(str, args), "--json"])
    try:
        answers = json.loads(result.stdout)
    except json.JSONDecodeError:
        answers = None
    return result.exit_code, answers, result.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, reference_dir: Path) -> Path:
    from tests.cli.test_predict import _mp4

    root = tmp_path_factory.mktemp("onnx-predict")
    for i in range(2):
        (root / f"img_{i}.png").write_bytes((reference_dir / "raw" / "imagenet" / "val" / f"img_{i}.png").read_bytes())
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    _mp4(root / "clip.mp4")
    (root / "labels.txt").write_text("tench\ngoldfish\ngreat white shark\nGolden Retriever\ntabby cat\n")
    (root / "texts.txt").write_text("a red square\na blue circle\na fish in water\na cat on a sofa\n")
    return root


def test_predict_on_the_onnx_folder_gives_pytorchs_answers(exported, files: Path):
    _, done, _, _ = exported
    inputs = [files / "img_0.png", files / "broken.jpg", files / "img_1.png", files / "clip.mp4"]
    for mode in (["--labels", files / "labels.txt", "--top-k", "3"], ["--texts", files / "texts.txt"],
                 ["--caption", "--max-len", "5"]):
        code, torch_answers, _ = _predict(*inputs, "--model", done.out, *mode)
        # one file per batch on onnxruntime against PyTorch's one batch: the same answers
        onnx_code, onnx_answers, stderr = _predict(*inputs, "--model", done.out / "onnx", *mode, "--batch-size", 1)
        assert code == onnx_code == 1 and "broken.jpg" in stderr  # the broken file is skipped, the others answered
        assert len(onnx_answers) == len(torch_answers) == 3
        for ours, theirs in zip(onnx_answers, torch_answers, strict=True):
            if "caption" in theirs:
                assert ours == theirs
                continue
            assert [e["text"] for e in ours["top"]] == [e["text"] for e in theirs["top"]]
            value = next(k for k in theirs["top"][0] if k != "text")
            assert [e[value] for e in ours["top"]] == pytest.approx([e[value] for e in theirs["top"]], abs=2e-5)


def test_predict_questions_and_sentences_on_the_onnx_folder(exported, files: Path):
    variant, done, _, _ = exported
    inputs = [files / "img_0.png", files / "img_1.png", files / "clip.mp4"]
    question = ["--question", "what is on the left?", "--label", "red", "--label", "a fish", "--label", "2"]
    code, torch_answers, _ = _predict(*inputs, "--model", done.out, *question)
    onnx_code, onnx_answers, stderr = _predict(*inputs, "--model", done.out / "onnx", *question)
    if variant == "moe":
        assert onnx_code == 2 and "has no vqa_encoder.onnx: its model is a mixture of experts" in stderr
    else:
        assert code == onnx_code == 1 and "takes images, not videos" in stderr
        for ours, theirs in zip(onnx_answers, torch_answers, strict=True):
            assert [e["text"] for e in ours["top"]] == [e["text"] for e in theirs["top"]]
            assert [e["prob"] for e in ours["top"]] == pytest.approx([e["prob"] for e in theirs["top"]], abs=2e-5)
    sentences = ["--sentence", "a fine film. It is <|spe|>.", "--sentence", "is a star round? <|spe|>", "--label",
                 "no", "--label", "yes"]
    code, torch_answers, _ = _predict("--model", done.out, *sentences)
    onnx_code, onnx_answers, _ = _predict("--model", done.out / "onnx", *sentences)
    assert code == onnx_code == 0 and [a["sentence"] for a in onnx_answers] == [a["sentence"] for a in torch_answers]
    for ours, theirs in zip(onnx_answers, torch_answers, strict=True):
        assert {e["text"]: e["prob"] for e in ours["top"]} == pytest.approx(
            {e["text"]: e["prob"] for e in theirs["top"]}, abs=2e-5)


def test_predict_with_onnx_runs_without_torch(exported, files: Path):
    _, done, _, _ = exported
    code = ("import sys; sys.modules['torch'] = None; from uniperceiver_cli.cli.app import app; "
            f"app(['predict', {str(files / 'img_0.png')!r}, '--model', {str(done.out / 'onnx')!r}, "
            f"'--labels', {str(files / 'labels.txt')!r}, '--json'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)[0]["top"][0]["text"] in (files / "labels.txt").read_text()
    code = ("import sys; sys.modules['torch'] = None; from uniperceiver_cli.cli.app import app; "
            f"app(['predict', '--sentence', 'a fine film. It is <|spe|>.', '--model', {str(done.out / 'onnx')!r}, "
            "'--label', 'bad', '--label', 'wonderful', '--json'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert {e["text"] for e in json.loads(out.stdout)[0]["top"]} == {"bad", "wonderful"}


def test_prompt_tuned_bundle_keeps_its_classifier_and_caption_set(files: Path, tmp_path: Path):
    """A classifier prompt maps names to its rows, and the caption graph scores the recorded token set."""
    import uniperceiver_cli as up

    torch.manual_seed(0)
    net = up.create_model("tiny", image_size=32, layer_scale_init=1.0, max_text_len=16,
                          prompt={"classifier_classes": 3, "deep_prompt_length": 2})
    with torch.no_grad():
        net.head.fc_prompt.weight.normal_(0, 5.0)
        for block in net.blocks:
            block.prompt.normal_(0, 0.5)
    net.class_names = ["tench", "goldfish", "tabby cat"]
    words = ["a", "red", "circle", "dog", "on"]
    net.caption_vocabulary = torch.tensor([up.get_tokenizer().encode(w, add_eot=False)[0] for w in words])
    up.save_bundle(net, tmp_path / "src")
    result = runner.invoke(app, ["export", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--onnx"])
    assert result.exit_code == 0, result.output
    assert all(f"onnx/{g}.onnx" in result.stdout for g in GRAPHS) and "max abs error against PyTorch" in result.stdout
    images = [files / "img_0.png", files / "img_1.png"]
    labels = ["--label", "tabby cat", "--label", "tench"]
    _, want, _ = _predict(*images, "--model", tmp_path / "src", *labels)
    code, got, _ = _predict(*images, "--model", tmp_path / "out" / "onnx", *labels)
    assert code == 0 and [r["top"][0]["text"] for r in got] == [r["top"][0]["text"] for r in want]
    assert [e["prob"] for r in got for e in r["top"]] == pytest.approx([e["prob"] for r in want for e in r["top"]],
                                                                      abs=2e-5)
    _, want, _ = _predict(*images, "--model", tmp_path / "src", "--caption", "--max-len", "4")
    code, got, _ = _predict(*images, "--model", tmp_path / "out" / "onnx", "--caption", "--max-len", "4")
    assert code == 0 and got == want and all(set(r["caption"].split()) <= set(words) for r in got)
    code, _, stderr = _predict(*images, "--model", tmp_path / "out" / "onnx", "--label", "zebra")
    assert code == 2 and "no logits for 'zebra'" in stderr and stderr.count("\n") == 1
    code, _, stderr = _predict(*images, "--model", tmp_path / "out" / "onnx", "--caption", "--vocabulary", "full")
    assert code == 2 and "export again with --vocabulary full" in stderr and stderr.count("\n") == 1
    # Exported over the whole vocabulary, the graph serves both: "trained" masks it to the recorded set.
    result = runner.invoke(app, ["export", str(tmp_path / "src"), "--out", str(tmp_path / "full"), "--onnx",
                                 "--vocabulary", "full"])
    assert result.exit_code == 0, result.output
    for choice in ("trained", "full"):
        _, want, _ = _predict(*images, "--model", tmp_path / "src", "--caption", "--max-len", "4",
                              "--vocabulary", choice)
        code, got, _ = _predict(*images, "--model", tmp_path / "full" / "onnx", "--caption", "--max-len", "4",
                                "--vocabulary", choice)
        assert code == 0 and got == want
    result = runner.invoke(app, ["export", str(tmp_path / "src"), "--out", str(tmp_path / "no"), "--vocabulary",
                                 "full"])
    assert result.exit_code == 2 and "it needs --onnx" in result.stderr and not (tmp_path / "no").exists()
    # --force replaces the bundle and its graphs, never an onnx/ folder holding something else.
    (tmp_path / "full" / "onnx" / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["export", str(tmp_path / "src"), "--out", str(tmp_path / "full"), "--force"])
    assert result.exit_code == 2 and "not the ONNX graphs" in result.stderr
    assert (tmp_path / "full" / "onnx" / "notes.txt").read_text() == "mine"


def test_fold_experts_from_the_cli(reference_dir: Path, tmp_path: Path, ref_moe_io: dict):
    out = tmp_path / "folded"
    result = runner.invoke(app, ["export", str(reference_dir / "ref_moe_state.pt"), "--out", str(out),
                                 "--fold-experts"])
    assert result.exit_code == 0, result.output
    assert "folded the experts: 3,701,830 parameters -> 3,996,358" in result.stdout
    folded, original = load_model(out), load_model(reference_dir / "ref_moe_state.pt")
    assert folded.config.moe.folded and json.loads((out / "config.json").read_text())["provenance"]["folded_experts"]
    images = ref_moe_io["retrieval"]["inputs"]["input_sample_list"][0]["data"]
    with torch.no_grad():
        torch.testing.assert_close(folded.encode_image(images), original.encode_image(images), atol=1e-5, rtol=0)
    result = runner.invoke(app, ["export", str(reference_dir / "ref_state.pt"), "--out", str(tmp_path / "dense"),
                                 "--fold-experts"])
    assert result.exit_code == 2 and "cannot fold the experts of a dense model" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "dense").exists()


def _tiny_bundle(path: Path) -> Path:
    import uniperceiver_cli as up

    torch.manual_seed(0)
    return up.save_bundle(UniPerceiver(get_config("tiny", image_size=32, max_text_len=16)), path)


def test_an_op_the_exporter_cannot_convert_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    @torch.library.custom_op("uniperceiver_test::no_onnx", mutates_args=())
    def no_onnx(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    no_onnx.register_fake(lambda x: torch.empty_like(x))
    features = UniPerceiver.features
    monkeypatch.setattr(UniPerceiver, "features", lambda self, out: features(self, no_onnx(out)))
    src = _tiny_bundle(tmp_path / "src")
    result = runner.invoke(app, ["export", str(src), "--out", str(tmp_path / "out"), "--onnx"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "ONNX export of the image_encoder graph failed" in result.stderr
    assert "uniperceiver_test" in result.stderr and "no_onnx" in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_graph_beyond_the_tolerance_fails_with_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(onnx_export, "TOLERANCE", 1e-12)
    src = _tiny_bundle(tmp_path / "src")
    with pytest.raises(CheckpointError, match=r"ONNX image_encoder: max abs error \S+ against PyTorch "
                                              r"exceeds 1e-12"):
        export(src, tmp_path / "out", onnx=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_missing_onnx_packages_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else find(name, *a))
    result = runner.invoke(app, ["export", str(_tiny_bundle(tmp_path / "src")), "--out", str(tmp_path / "out"),
                                 "--onnx"])
    assert result.exit_code == 2 and "--onnx needs onnxscript: pip install 'uniperceiver[onnx]'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_broken_onnx_folder_is_one_line(exported, files: Path, tmp_path: Path):
    _, done, _, _ = exported
    broken = shutil.copytree(done.out / "onnx", tmp_path / "onnx")  # links out of the folder would be refused
    (broken / MANIFEST).write_text('{"format": "uniperceiver-onnx", "version": 1, "image_size": "big"}')
    code, _, stderr = _predict(files / "img_0.png", "--model", broken, "--caption")
    assert code == 2 and "is malformed" in stderr and stderr.count("\n") == 1
    manifest = json.loads((done.out / "onnx" / MANIFEST).read_text())
    for key, value in (("image_size", 10**9), ("max_text_len", True), ("caption_token_ids", [10**6]),
                       ("temperatures", {"img_cls": "inf"})):
        (broken / MANIFEST).write_text(json.dumps({**manifest, key: value}))
        code, _, stderr = _predict(files / "img_0.png", "--model", broken, "--caption")
        assert code == 2 and "is malformed" in stderr and key in stderr and stderr.count("\n") == 1
    (broken / MANIFEST).write_text("{not json")
    code, _, stderr = _predict(files / "img_0.png", "--model", broken, "--caption")
    assert code == 2 and "cannot read" in stderr and stderr.count("\n") == 1
    with pytest.raises(OnnxModelError, match="is not an exported ONNX folder"):
        OnnxModel(tmp_path)
    (broken / MANIFEST).write_text((done.out / "onnx" / MANIFEST).read_text())
    (broken / "caption_step.onnx").write_bytes(b"\x08\x07garbage")
    code, _, stderr = _predict(files / "img_0.png", "--model", broken, "--caption")
    assert code == 2 and "cannot load" in stderr and "caption_step.onnx" in stderr and stderr.count("\n") == 1
