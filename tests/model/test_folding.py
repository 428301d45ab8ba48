"""Folding the experts of the reference MoE fixture: the same outputs, a bundle that round-trips, one row's dense
model, and refusals (a dense or already folded model, training a folded one)."""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import uniperceiver_cli as up
from uniperceiver_cli.checkpoints.bundle import save_bundle
from uniperceiver_cli.checkpoints.errors import CheckpointError
from uniperceiver_cli.checkpoints.loading import load_model
from uniperceiver_cli.cli.app import app
from uniperceiver_cli.model.decoding import beam_search
from uniperceiver_cli.model.folding import dense_view, fold_experts
from uniperceiver_cli.model.moe import ATTRIBUTES, ExpertLinear, FoldedGate, Routing
from uniperceiver_cli.train.loop import build_model
from uniperceiver_cli.train.recipe import validate

CLOSE = {"atol": 1e-5, "rtol": 0}
FOLDED_MESSAGE = "a folded model is for inference only"


@pytest.fixture(scope="module")
def models(reference_dir: Path) -> tuple[up.UniPerceiver, up.UniPerceiver]:
    moe = load_model(reference_dir / "ref_moe_state.pt")
    return moe, fold_experts(moe)


def _targets(model, target_set):
    return model.encode_text(target_set["data"], target_set["invalid_mask"].bool())


def test_a_folded_model_holds_one_merged_linear_per_attribute_row(models):
    moe, folded = models
    assert folded.config == up.get_config(moe.config, moe={"folded": True})
    assert not folded.training
    gates = [m for m in folded.modules() if isinstance(m, FoldedGate)]
    assert len(gates) == 4 and all(not list(g.parameters()) for g in gates)  # attention and MLP of layers 0, 2
    experts = [m for m in folded.modules() if isinstance(m, ExpertLinear)]
    assert experts and all(m.weight.shape[0] == m.bias.shape[0] == len(ATTRIBUTES) for m in experts)
    assert not any(".gate." in key for key in folded.state_dict())


@torch.no_grad()
def test_folded_image_classification(models, ref_moe_io):
    inputs = ref_moe_io["image_cls"]["inputs"]
    images, targets = inputs["input_sample_list"][0]["data"], inputs["shared_target_sets"]["ImageNet1k"]
    moe, folded = models
    torch.testing.assert_close(folded.classification_logits(images, _targets(folded, targets)),
                               moe.classification_logits(images, _targets(moe, targets)), **CLOSE)


@torch.no_grad()
def test_folded_retrieval_features(models, ref_moe_io):
    inputs = ref_moe_io["retrieval"]["inputs"]
    images, captions = inputs["input_sample_list"][0]["data"], inputs["target_sample_list"][0]
    moe, folded = models
    torch.testing.assert_close(folded.encode_image(images), moe.encode_image(images), **CLOSE)
    torch.testing.assert_close(folded.encode_text(captions["data"], captions["invalid_mask"].bool()),
                               moe.encode_text(captions["data"], captions["invalid_mask"].bool()), **CLOSE)


@torch.no_grad()
def test_folded_multi_view_video_classification(models, ref_moe_io):
    inputs = ref_moe_io["video_cls"]["inputs"]
    views, targets = inputs["input_sample_list"][0]["data"], inputs["shared_target_sets"]["Kinetics400"]
    moe, folded = models
    torch.testing.assert_close(folded.classification_logits(views, _targets(folded, targets)),
                               moe.classification_logits(views, _targets(moe, targets)), **CLOSE)


@torch.no_grad()
def test_folded_vocabulary_features(models, ref_moe_io):
    ids = ref_moe_io["caption"]["outputs"]["vocab_encoder_tok0_subset_idx"]
    pairs = torch.stack([ids, torch.full_like(ids, 49407)], dim=1)
    moe, folded = models
    routing = Routing(("vocabulary",))
    torch.testing.assert_close(folded.encode_text_tokens(pairs, routing=routing),
                               moe.encode_text_tokens(pairs, routing=routing), **CLOSE)
    torch.testing.assert_close(folded.vocabulary_features(), moe.vocabulary_features(), **CLOSE)


@torch.no_grad()
def test_folded_caption_beam_search(models, ref_moe_io):
    cap = ref_moe_io["caption"]
    expected, images = cap["outputs"], cap["inputs"]["input_sample_list"][0]["data"]
    results = [beam_search(model, images, beam_size=expected["beam_size"], max_len=expected["eval_max_seq_len"],
                           len_penalty=expected["len_penalty"], vocabulary=model.vocabulary_features())
               for model in models]
    assert torch.equal(results[1].tokens, results[0].tokens)
    assert torch.equal(results[1].tokens, expected["G_SENTS_IDS"])
    torch.testing.assert_close(results[1].token_logprobs, results[0].token_logprobs, **CLOSE)


@torch.no_grad()
def test_dense_view_of_the_visual_row_is_a_dense_model(models, ref_moe_io):
    images = ref_moe_io["retrieval"]["inputs"]["input_sample_list"][0]["data"]
    moe, folded = models
    dense_size = up.create_model("tiny").num_parameters()
    for model in models:
        dense = dense_view(model, "visual_input")
        assert dense.config.moe is None and dense.config == up.get_config(moe.config, moe=None)
        assert dense.num_parameters() == dense_size
        torch.testing.assert_close(dense.encode_image(images), moe.encode_image(images), **CLOSE)
    plain = up.create_model("tiny")
    assert dense_view(plain, "text_input") is plain
    with pytest.raises(ValueError, match=r"^unknown attribute row 'audio'; known: visual_input, text_input, "):
        dense_view(moe, "audio")


def test_fold_refuses_a_dense_and_a_folded_model(models):
    with pytest.raises(ValueError, match="^cannot fold the experts of a dense model: it has none$"):
        fold_experts(up.create_model("tiny"))
    with pytest.raises(ValueError, match="^the model's experts are already folded$"):
        fold_experts(models[1])


def test_fold_carries_what_the_weights_were_trained_over(models):
    moe = models[0]
    moe.class_names, moe.caption_vocabulary = ["cat", "dog"], torch.tensor([5, 49407])
    try:
        folded = fold_experts(moe)
    finally:
        moe.class_names = moe.caption_vocabulary = None
    assert folded.class_names == ["cat", "dog"] and folded.caption_vocabulary.tolist() == [5, 49407]


@torch.no_grad()
def test_folded_bundle_round_trip(models, ref_moe_io, tmp_path: Path):
    folded = models[1]
    save_bundle(folded, tmp_path / "folded")
    loaded = load_model(tmp_path / "folded")
    assert loaded.config == folded.config and loaded.config.moe.folded
    ours, theirs = folded.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    images = ref_moe_io["retrieval"]["inputs"]["input_sample_list"][0]["data"]
    assert torch.equal(loaded.encode_image(images), folded.encode_image(images))


def test_a_folded_model_builds_and_reports_its_parameter_roles():
    model = up.create_model("tiny-moe", moe={"folded": True})
    model.reset_parameters()
    names = {name for name, _ in model.named_parameters()}
    assert "blocks.0.attn.qkv.weight" in names and not any(".gate." in name for name in names)
    no_decay = model.no_weight_decay()
    assert "blocks.0.attn.qkv.weight" not in no_decay and "blocks.0.attn.qkv.bias" in no_decay
    assert "blocks.0.norm1.weight" in model.prompt_parameters()


def _tiny_moe_recipe(**changes) -> dict:
    import yaml

    data = yaml.safe_load((Path(__file__).parents[2] / "recipes" / "toyworld-tiny-moe.yaml").read_text())
    data.update(changes)
    return data


def test_training_a_folded_model_is_refused(tmp_path: Path):
    data = _tiny_moe_recipe()
    data["model"]["overrides"]["moe"] = {"folded": True}
    refused = rf"^the recipe's model has folded experts \(moe.folded\), and {FOLDED_MESSAGE}; train the unfolded model$"
    with pytest.raises(ValueError, match=refused):
        build_model(validate(data))
    recipe = validate(_tiny_moe_recipe())
    save_bundle(fold_experts(build_model(recipe)), tmp_path / "folded")
    with pytest.raises(CheckpointError, match=f"holds a model with folded experts, and {FOLDED_MESSAGE}: .*; train "
                                              f"from the unfolded model$"):
        build_model(validate(_tiny_moe_recipe(init=str(tmp_path / "folded"))))
    result = CliRunner().invoke(app, ["pretrain", "--recipe", "toyworld-tiny-moe", "--run-dir",
                                      str(tmp_path / "run"), "--init", str(tmp_path / "folded"), "--device", "cpu"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error:") and FOLDED_MESSAGE in result.output
