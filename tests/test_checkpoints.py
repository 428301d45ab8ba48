"""Bundles, official imports (torch and DeepSpeed formats, dense and MoE) and clear load errors."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import uniperceiver_cli as up
from uniperceiver_cli.checkpoints.bundle import save_bundle
from uniperceiver_cli.checkpoints.errors import CheckpointError, CheckpointWarning
from uniperceiver_cli.checkpoints.loading import load_checkpoint, load_model

SIZE = 32


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture
def images():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_bundle_round_trip(tmp_path, images):
    torch.manual_seed(0)
    model = up.create_model("tiny-moe", image_size=SIZE, prompt={"deep_prompt_length": 2, "spe_bias": True}).eval()
    save_bundle(model, tmp_path / "bundle")
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert meta["model"]["moe"]["num_experts"] == 4 and meta["model"]["image_size"] == SIZE
    assert meta["tokenizer"]["vocab_size"] == 49411 and meta["preprocessing"]["video_mean"] == [0.5] * 3
    loaded = up.load_model(tmp_path / "bundle")
    assert loaded.config == model.config and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
    other = up.create_model(loaded.config)
    report = load_checkpoint(other, tmp_path / "bundle" / "model.safetensors")
    assert report.ok
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def _bundle(tmp_path, edit):
    model = up.create_model("tiny", image_size=SIZE)
    save_bundle(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    edit(state)
    save_file(state, tmp_path / "model.safetensors")
    return tmp_path


def test_missing_key_is_named(tmp_path):
    path = _bundle(tmp_path, lambda s: s.pop("blocks.1.norm2.weight"))
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert "1 missing key(s): blocks.1.norm2.weight" in _one_line(error)


def test_unexpected_key_is_named(tmp_path):
    path = _bundle(tmp_path, lambda s: s.update({"blocks.0.extra": torch.zeros(3)}))
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert "1 unexpected key(s): blocks.0.extra" in _one_line(error)


def test_wrong_shape_is_named(tmp_path):
    path = _bundle(tmp_path, lambda s: s.update({"head.proj.weight": torch.zeros(64, 32)}))
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert "head.proj.weight: checkpoint (64, 32) vs model (64, 64)" in _one_line(error)


def test_non_strict_load_reports_and_loads_the_rest(tmp_path):
    path = _bundle(tmp_path, lambda s: (s.pop("blocks.1.norm2.weight"), s.update({"extra": torch.zeros(1)})))
    model = up.create_model("tiny", image_size=SIZE)
    report = load_checkpoint(model, path, strict=False)
    assert report.missing == ["blocks.1.norm2.weight"] and report.unexpected == ["extra"]
    assert torch.equal(model.head.proj.weight, load_file(path / "model.safetensors")["head.proj.weight"])


def test_truncated_files_fail_with_one_line(tmp_path, reference_dir):
    path = _bundle(tmp_path / "b", lambda s: None)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert re.search(r"cannot read checkpoint .*model\.safetensors: truncated or corrupt", _one_line(error))
    official = (reference_dir / "ref_state.pt").read_bytes()
    (tmp_path / "cut.pth").write_bytes(official[: len(official) // 3])
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path / "cut.pth")
    assert "cannot read checkpoint" in _one_line(error) and "cut.pth" in str(error.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nothing.pth")


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_not_executed(tmp_path, capsys):
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="unsafe"):
        load_model(tmp_path / "evil.pth")
    assert "pickled code ran" not in capsys.readouterr().out



def _edit_config(path, edit):
    meta = json.loads((path / "config.json").read_text())
    edit(meta)
    (path / "config.json").write_text(json.dumps(meta))
    return path


def test_bundle_records_class_names_and_caption_vocabulary(tmp_path):
    model = up.create_model("tiny", image_size=SIZE, prompt={"classifier_classes": 3})
    assert model.class_names is None and model.caption_vocabulary is None
    model.class_names = ["zebra", "Café", "crane"]
    model.caption_vocabulary = torch.tensor([320, 1929, 49407])
    save_bundle(model, tmp_path / "bundle")
    meta = json.loads((tmp_path / "bundle" / "config.json").read_text(encoding="utf-8"))
    assert meta["targets"] == {"class_names": ["zebra", "Café", "crane"], "caption_vocabulary": [320, 1929, 49407]}
    loaded = load_model(tmp_path / "bundle")
    assert loaded.class_names == model.class_names and loaded.caption_vocabulary.tolist() == [320, 1929, 49407]
    other = up.create_model(loaded.config)
    load_checkpoint(other, tmp_path / "bundle")
    assert other.class_names == model.class_names and other.caption_vocabulary.tolist() == [320, 1929, 49407]
    load_checkpoint(other, tmp_path / "bundle" / "model.safetensors")  # a weights file records neither
    assert other.class_names is None and other.caption_vocabulary is None
    older = _edit_config(tmp_path / "bundle", lambda m: m.pop("targets"))  # written before targets were kept
    assert load_model(older).class_names is None and load_model(older).caption_vocabulary is None


@pytest.mark.parametrize(("targets", "message"), [
    ({"class_names": ["a", "b"]}, "targets.class_names must list the 3 class names"),
    ({"class_names": ["a", "b", 3]}, "targets.class_names"),
    ({"caption_vocabulary": [320, 49411]}, "targets.caption_vocabulary must be a list of token ids in [0, 49411)"),
    ({"caption_vocabulary": []}, "targets.caption_vocabulary"),
    ("all of them", "targets must be a mapping"),
])
def test_bad_recorded_targets_fail_with_one_line(tmp_path, targets, message):
    save_bundle(up.create_model("tiny", image_size=SIZE, prompt={"classifier_classes": 3}), tmp_path)
    _edit_config(tmp_path, lambda m: m.update(targets=targets))
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path)
    assert message in _one_line(error) and "config.json" in str(error.value)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("width", -64, "width must be a positive integer, got -64"),
    ("layers", 0, "layers must be a positive integer, got 0"),
    ("heads", "2", "heads must be a positive integer, got '2'"),
    ("prompt", {"classifier_classes": -3}, "config.json: classifier_classes must be an integer >= 0, got -3"),
    ("drop_path", 5.0, "config.json: drop_path must be a finite number in [0.0, 1.0), got 5.0"),
])
def test_invalid_config_values_fail_with_one_line(tmp_path, field, value, message):
    save_bundle(up.create_model("tiny", image_size=SIZE), tmp_path)
    _edit_config(tmp_path, lambda m: m["model"].update({field: value}))
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path)
    assert message in _one_line(error)


def test_non_finite_weights_warn_with_their_count(tmp_path, recwarn):
    def poison(state):
        state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
        state["head.proj.bias"][1] = float("inf")

    path = _bundle(tmp_path, poison)
    with pytest.warns(CheckpointWarning) as caught:
        model = load_model(path)
    message = str(caught[0].message)
    assert len(caught) == 1 and "\n" not in message
    assert f"{len(model.state_dict())} tensors hold NaN or infinite values" in message
    assert message.split(" tensors")[0].endswith(f"2 of {len(model.state_dict())}")
    assert "blocks.0.attn.qkv.weight, head.proj.bias" in message
    with pytest.warns(CheckpointWarning, match="2 of"):
        load_checkpoint(up.create_model("tiny", image_size=SIZE), path)
    recwarn.clear()
    load_model(_bundle(tmp_path / "clean", lambda s: None))
    assert not [w for w in recwarn if w.category is CheckpointWarning]


# -------------------------------------------------------------------------- official formats
def _to_deepspeed(state: dict[str, torch.Tensor], video_type: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inverse of the reference's converters: "torch" keys -> the DeepSpeed-era names."""
    renames = [("fused_encoder.", "encoder."), ("self_attn.in_proj_", "attention.self.qkv_proj."),
               ("self_attn.out_proj", "attention.output.dense"), ("self_attn.qkv_proj", "attention.self.qkv_proj"),
               ("self_attn.dense", "attention.output.dense"), ("linear1.", "ffn.dense."),
               ("linear2.", "ffn.dense2."), ("norm1.", "LayerNormModules.0."), ("norm2.", "LayerNormModules.1."),
               ("loss_prepare.", "predictor."), (".gate.", ".deepspeed_moe.gate."),
               (".experts.", ".deepspeed_moe.experts.")]
    out = {}
    for key, value in state.items():
        if key.endswith(("gamma_1", "gamma_2")):
            key = key.replace("gamma_1", "attention_output.residual_scale").replace(
                "gamma_2", "ffn_output.residual_scale")
            value = value.reshape(1, 1, -1)
        if key.startswith("token_embed.") or key.startswith("video_embed."):
            out[key] = value.clone()
            continue
        for ours, theirs in renames:
            key = key.replace(ours, theirs)
        out[key] = value.clone()
    out["video_embed.embeddings_type.weight"] = video_type[None].clone()
    out["visual_embed.unused"] = torch.zeros(2)  # dropped by the reference's converter
    return out


@pytest.mark.parametrize("state_file", ["ref_state.pt", "ref_moe_state.pt"])
def test_deepspeed_import_folds_the_video_type(tmp_path, reference_dir, state_file):
    state = torch.load(reference_dir / state_file, map_location="cpu", weights_only=True)
    video_type = torch.randn(64, generator=torch.Generator().manual_seed(2))
    torch.save({"module": _to_deepspeed(state, video_type), "ds_version": "0.5.8", "global_steps": 7},
               tmp_path / "mp_rank_00_model_states.pt")
    folded = dict(state)
    folded["video_embed.embeddings.bias"] = state["video_embed.embeddings.bias"] + video_type
    torch.save({"model": folded}, tmp_path / "torch.pth")
    from_ds = load_model(tmp_path / "mp_rank_00_model_states.pt")
    from_torch = load_model(tmp_path / "torch.pth")
    assert from_ds.config == from_torch.config
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(from_ds.encode_image(images), from_torch.encode_image(images))
    for key, value in from_torch.state_dict().items():
        torch.testing.assert_close(from_ds.state_dict()[key], value, msg=key)


def test_official_torch_file_ignores_its_type_row_unless_asked(tmp_path, reference_dir):
    state = torch.load(reference_dir / "ref_moe_state.pt", map_location="cpu", weights_only=True)
    torch.save({"model": state}, tmp_path / "moe.pth")
    plain = load_model(tmp_path / "moe.pth")
    with_type = load_model(tmp_path / "moe.pth", fold_video_type=True)  # a "-withvtype" MoE file
    expected = state["video_embed.embeddings.bias"] + state["video_embed.embeddings_type.weight"][0]
    assert torch.equal(plain.visual_embed.patch.bias, state["video_embed.embeddings.bias"])
    torch.testing.assert_close(with_type.visual_embed.patch.bias, expected)
    assert plain.config.moe.num_experts == 4 and plain.config.heads == 2


def test_official_unknown_key_is_reported(tmp_path, reference_dir):
    state = torch.load(reference_dir / "ref_state.pt", map_location="cpu", weights_only=True)
    state["fused_encoder.layers.0.mystery.weight"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path / "odd.pth")
    assert "unexpected key(s): fused_encoder.layers.0.mystery.weight" in _one_line(error)
    model = load_model(tmp_path / "odd.pth", strict=False)
    assert model.config.width == 64


def test_our_state_files_load_as_they_are_and_are_never_official(tmp_path):
    """A state dict in our names (a single-engine state.pt, a bare torch.save) loads without renaming into
    load_model and load_checkpoint; read_official refuses it instead of mapping it as the reference's."""
    from uniperceiver_cli.checkpoints.sources import read_official

    torch.manual_seed(0)
    model = up.create_model("tiny")
    torch.save({"model": model.state_dict(), "step": 5}, tmp_path / "state.pt")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    for name in ("state.pt", "bare.pt"):
        with pytest.raises(CheckpointError, match="written by this toolkit, not an official checkpoint"):
            read_official(tmp_path / name)
        other = up.create_model("tiny")
        assert load_checkpoint(other, tmp_path / name).ok
        loaded = load_model(tmp_path / name)
        for key, value in model.state_dict().items():
            assert torch.equal(other.state_dict()[key], value) and torch.equal(loaded.state_dict()[key], value), key
