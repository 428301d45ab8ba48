"""Files a user may be handed (a bundle, a run's config, an ONNX folder): none runs code, reads outside its folder
or exhausts memory before it is refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import uniperceiver_cli as up
from uniperceiver_cli.checkpoints import loading, sources
from uniperceiver_cli.checkpoints.bundle import save_bundle
from uniperceiver_cli.checkpoints.errors import CheckpointError
from uniperceiver_cli.checkpoints.loading import load_checkpoint, load_model
from uniperceiver_cli.checkpoints.runs import EXPERTS_DIR, MAX_SIDE_FILE, expert_shard_file
from uniperceiver_cli.onnx.runtime import GRAPHS, MANIFEST, TOKENIZER_FILE, OnnxModel, OnnxModelError

SIZE = 32


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def _bundle(path: Path, **model: object) -> Path:
    save_bundle(up.create_model("tiny", image_size=SIZE), path)
    meta = json.loads((path / "config.json").read_text())
    meta["model"].update(model)
    (path / "config.json").write_text(json.dumps(meta))
    return path


@pytest.fixture
def built_only_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model is allocated anywhere but on the meta device (which allocates nothing)."""
    real = loading.UniPerceiver

    def build(config):  # noqa: ANN001, ANN202
        if torch.empty(0).device.type != "meta":
            raise AssertionError(f"a model of {config.layers} layers, width {config.width} was allocated")
        return real(config)

    monkeypatch.setattr(loading, "UniPerceiver", build)


# ------------------------------------------------------------------------------------- a config larger than its weights
@pytest.mark.parametrize(("model", "message"), [
    ({"layers": 6}, "does not fit the model: the config has 6 layers, the weights 3"),
    ({"layers": 1_000_000}, "layers must be at most"),
    ({"width": 16384}, "blocks.0.attn.qkv.weight: checkpoint (192, 64) vs model (49152, 16384)"),
    ({"mlp_dim": 65536}, "blocks.0.mlp.fc1.weight: checkpoint (256, 64) vs model (65536, 64)"),
])
def test_a_config_larger_than_its_weights_is_refused_before_building(tmp_path, built_only_on_meta, model, message):
    with pytest.raises(CheckpointError) as error:
        load_model(_bundle(tmp_path, **model))
    assert message in _one_line(error)


def test_a_larger_config_is_refused_when_not_strict_too(tmp_path, built_only_on_meta):
    with pytest.raises(CheckpointError) as error:
        load_model(_bundle(tmp_path, width=16384), strict=False)
    assert "does not fit the model: the config describes 4,346,135,302 parameters, more than the 3,399,622 the " \
           "weights hold" in _one_line(error)


def test_a_run_config_larger_than_its_checkpoint_is_refused(tmp_path, built_only_on_meta):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000001").mkdir(parents=True)
    torch.save({"model": up.create_model("tiny").state_dict(), "step": 1},
               run / "checkpoints" / "step-0000001" / "state.pt")
    (run / "config.yaml").write_text("model:\n  preset: tiny\n  overrides:\n    width: 16384\n")
    with pytest.raises(CheckpointError) as error:
        load_model(run, latest=True)
    assert "does not fit the model" in _one_line(error) and "wrong shape" in str(error.value)


# ------------------------------------------------------------------------------------- dtypes relabelled in a header
def _relabel(path: Path, name: str, dtype: str) -> None:
    """Rewrite the dtype of tensor ``name`` in a safetensors header, keeping the data (same byte size)."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header[name]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode().ljust(size)
    assert len(text) == size
    path.write_bytes(data[:8] + text + data[8 + size:])


def test_float_weights_relabelled_as_integers_are_refused(tmp_path):
    model = up.create_model("tiny-moe", image_size=SIZE, prompt={"classifier_classes": 2})
    assert all(v.is_floating_point() for v in model.state_dict().values())  # no integer state to let through
    save_bundle(model, tmp_path / "b")
    _relabel(tmp_path / "b" / "model.safetensors", "head.proj.weight", "I32")
    for load in (lambda: load_model(tmp_path / "b"), lambda: load_checkpoint(model, tmp_path / "b"),
                 lambda: load_checkpoint(model, tmp_path / "b" / "model.safetensors")):
        with pytest.raises(CheckpointError) as error:
            load()
        assert f"{tmp_path / 'b' / 'model.safetensors'}: tensor head.proj.weight is I32, not a floating-point" \
            in _one_line(error)


def test_float_weights_pickled_as_integers_are_refused(tmp_path):
    model = up.create_model("tiny", image_size=SIZE)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.proj.weight"] = state["head.proj.weight"].view(torch.int32)  # the same bytes, relabelled
    torch.save({"model": state}, tmp_path / "relabelled.pth")
    with pytest.raises(CheckpointError, match="tensor head.proj.weight is torch.int32, not a floating-point dtype"):
        load_checkpoint(model, tmp_path / "relabelled.pth")


def test_a_relabelled_expert_shard_is_refused(tmp_path):
    key = "blocks.0.mlp.fc1.weight"
    file = tmp_path / "step-0000002" / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    (tmp_path / "step-0000002" / EXPERTS_DIR).mkdir(parents=True)
    shards = [tmp_path / "step-0000002" / EXPERTS_DIR / expert_shard_file(rank, 2) for rank in range(2)]
    for shard in shards:
        save_file({key: torch.ones(2, 8, 4)}, str(shard))
    state = {key: torch.zeros(2, 8, 4)}
    assert sources._stack_experts(state, file)[0][key].shape == (4, 8, 4)
    _relabel(shards[1], key, "I32")
    with pytest.raises(CheckpointError) as error:
        sources._stack_experts(state, file)
    assert f"{shards[1]}: tensor {key} is I32" in _one_line(error)


# ------------------------------------------------------------------------------------- side files
def test_an_oversized_bundle_config_is_refused_unread(tmp_path):
    path = _bundle(tmp_path)
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(meta) + " " * MAX_SIDE_FILE)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert f"{path / 'config.json'} is larger than 8 MB" in _one_line(error)


def _run(tmp_path: Path, config: str) -> Path:
    run = tmp_path / "run"
    save_bundle(up.create_model("tiny", image_size=SIZE), run / "final")
    (run / "config.yaml").write_text(config)
    return run


@pytest.mark.parametrize(("config", "message"), [
    ("model: &m {preset: tiny}\nother: *m\n", "config.yaml: line 1: anchors and aliases"),
    ("model: {preset: tiny}\nmodel: {preset: base}\n", "config.yaml: line 2: key 'model' is given twice"),
    ("name: x\n" + "#" * MAX_SIDE_FILE + "\n", "config.yaml is larger than 8 MB"),
])
def test_a_run_config_is_read_as_a_recipe(tmp_path, config, message):
    with pytest.raises(CheckpointError) as error:
        load_model(_run(tmp_path, config))
    assert message in _one_line(error)


# ------------------------------------------------------------------------------------- ONNX folders
def _onnx_folder(path: Path, class_names: list[str] | None = None) -> Path:
    """An ONNX folder's files as OnnxModel checks them on opening (the graphs are never run here)."""
    path.mkdir()
    manifest = {"format": "uniperceiver-onnx", "version": 1, "image_size": SIZE, "max_frames": 8, "max_text_len": 16,
                "temperatures": {"img_cls": 10.0}, "class_names": class_names, "classifier": None}
    (path / MANIFEST).write_text(json.dumps(manifest))
    for graph in GRAPHS:
        (path / f"{graph}.onnx").write_bytes(b"")
    (path / TOKENIZER_FILE).write_bytes(b"")
    return path


@pytest.mark.parametrize("name", [MANIFEST, TOKENIZER_FILE, "caption_step.onnx"])
def test_onnx_files_linked_outside_the_folder_are_refused(tmp_path, name):
    outside = _onnx_folder(tmp_path / "outside", class_names=["MARKER"])
    folder = _onnx_folder(tmp_path / "onnx")
    (folder / name).unlink()
    (folder / name).symlink_to(outside / name)
    with pytest.raises(OnnxModelError) as error:
        OnnxModel(folder)
    assert f"{folder / name} links outside {folder}" in _one_line(error)


def test_onnx_links_inside_the_folder_are_used(tmp_path):
    outside = _onnx_folder(tmp_path / "outside", class_names=["MARKER"])
    folder = _onnx_folder(tmp_path / "onnx", class_names=["cat"])
    (folder / "graphs").mkdir()
    (folder / "graphs" / "caption_step.onnx").write_bytes(b"")
    (folder / "caption_step.onnx").unlink()
    (folder / "caption_step.onnx").symlink_to("graphs/caption_step.onnx")
    assert OnnxModel(folder).manifest.class_names == ["cat"]
    (tmp_path / "linked").symlink_to(outside)  # a link to a whole folder is that folder
    assert OnnxModel(tmp_path / "linked").manifest.class_names == ["MARKER"]


def test_an_oversized_onnx_manifest_is_refused_unread(tmp_path):
    folder = _onnx_folder(tmp_path / "onnx")
    (folder / MANIFEST).write_text((folder / MANIFEST).read_text() + " " * MAX_SIDE_FILE)
    with pytest.raises(OnnxModelError) as error:
        OnnxModel(folder)
    assert f"{folder / MANIFEST} is larger than 8 MB" in _one_line(error)
