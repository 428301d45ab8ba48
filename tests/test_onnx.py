"""``export --onnx`` and the torch-free runtime: graphs equal PyTorch, the reference fixtures' labels and caption
tokens come out of onnxruntime, MoE folding changes nothing, and bad input is one line with nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from uniperceiver_cli.export import export
from uniperceiver_cli.onnx_runtime import GRAPHS, MANIFEST, OnnxModel

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
    assert [g.name for g in done.graphs] == list(GRAPHS)
    assert all(0 <= g.max_abs_error <= 1e-4 for g in done.graphs)
    manifest = json.loads((done.out / "onnx" / MANIFEST).read_text())
    assert manifest["validation"] == {g.name: g.max_abs_error for g in done.graphs}
    assert manifest["caption_token_ids"] is None and manifest["provenance"]["kind"] == "official"
    # An MoE graph is traced from the dense view of its attribute row: no graph holds the experts or gates.
    import onnx

    for name in GRAPHS:
        graph = onnx.load(str(done.out / "onnx" / f"{name}.onnx"))
        assert not any("expert" in init.name or "gate" in init.name for init in graph.graph.initializer)


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
from uniperceiver_cli.onnx_runtime import OnnxModel
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
