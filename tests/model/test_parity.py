"""Parity with the reference implementation's tiny fixtures (../shared/reference, fp32 CPU)."""

import pytest
import torch

from uniperceiver_cli.checkpoints.loading import load_model
from uniperceiver_cli.model.decoding import beam_search
from uniperceiver_cli.model.embeddings import sincos_2d
from uniperceiver_cli.model.moe import Routing
from uniperceiver_cli.model.tokenizer import get_tokenizer

LOGITS = {"atol": 1e-4, "rtol": 1e-5}
FEATS = {"atol": 1e-5, "rtol": 0}


@pytest.fixture(scope="module", params=["dense", "moe"])
def case(request, reference_dir):
    variant = request.param
    state = "ref_state.pt" if variant == "dense" else "ref_moe_state.pt"
    io = torch.load(reference_dir / ("ref_io.pt" if variant == "dense" else "ref_moe_io.pt"),
                    map_location="cpu", weights_only=True)
    model = load_model(reference_dir / state)
    assert (model.config.moe is not None) == (variant == "moe")
    with torch.no_grad():
        vocabulary = model.vocabulary_features()
    return model, io, vocabulary


def _targets(model, target_set):
    return model.encode_text(target_set["data"], target_set["invalid_mask"].bool())


@torch.no_grad()
def test_image_classification(case):
    model, io, _ = case
    inputs = io["image_cls"]["inputs"]
    logits = model.classification_logits(inputs["input_sample_list"][0]["data"],
                                         _targets(model, inputs["shared_target_sets"]["ImageNet1k"]))
    expected = io["image_cls"]["outputs"]
    torch.testing.assert_close(logits, expected["logits"], **LOGITS)
    assert torch.equal(logits.argmax(-1), expected["pred"])


@torch.no_grad()
def test_retrieval_features_and_similarities(case):
    model, io, _ = case
    inputs, expected = io["retrieval"]["inputs"], io["retrieval"]["outputs"]
    images = model.encode_image(inputs["input_sample_list"][0]["data"])
    captions = inputs["target_sample_list"][0]
    texts = model.encode_text(captions["data"], captions["invalid_mask"].bool())
    torch.testing.assert_close(images, expected["image_feats"], **FEATS)
    torch.testing.assert_close(texts, expected["text_feats"], **FEATS)
    torch.testing.assert_close(images @ texts.T, expected["sim_i2t"], **FEATS)
    torch.testing.assert_close(texts @ images.T, expected["sim_t2i"], **FEATS)


@torch.no_grad()
def test_multi_view_video_classification(case):
    model, io, _ = case
    inputs, expected = io["video_cls"]["inputs"], io["video_cls"]["outputs"]
    views = inputs["input_sample_list"][0]["data"]  # (videos * 3 views, T, 3, H, W)
    logits = model.classification_logits(views, _targets(model, inputs["shared_target_sets"]["Kinetics400"]))
    torch.testing.assert_close(logits, expected["logits"], **LOGITS)
    probs = logits.softmax(-1).view(-1, 3, logits.shape[-1]).mean(1)
    torch.testing.assert_close(probs, expected["view_avg_probs"], **FEATS)


@torch.no_grad()
def test_vocabulary_encoder_outputs(case):
    model, io, _ = case
    expected = io["caption"]["outputs"]
    ids = expected["vocab_encoder_tok0_subset_idx"]
    pairs = torch.stack([ids, torch.full_like(ids, 49407)], dim=1)
    out = model.encode_text_tokens(pairs, routing=Routing(("vocabulary",)))
    torch.testing.assert_close(out[:, 0], expected["vocab_encoder_tok0_subset"], **FEATS)


@torch.no_grad()
def test_caption_beam_search(case):
    model, io, vocabulary = case
    cap = io["caption"]
    expected = cap["outputs"]
    images = cap["inputs"]["input_sample_list"][0]["data"]
    result = beam_search(model, images, beam_size=expected["beam_size"], max_len=expected["eval_max_seq_len"],
                         len_penalty=expected["len_penalty"], vocabulary=vocabulary, keep_logits=True)
    assert len(result.step_logits) == len(expected["step_logits"])
    for ours, ref in zip(result.step_logits, expected["step_logits"], strict=True):
        torch.testing.assert_close(ours, ref, **LOGITS)
    for ours, ref in zip(result.trace, expected["beam_trace"], strict=True):
        assert torch.equal(ours["selected_beam"], ref["selected_beam"])
        assert torch.equal(ours["selected_words"], ref["selected_words"])
        torch.testing.assert_close(ours["selected_logprob"], ref["selected_logprob"], **LOGITS)
    assert torch.equal(result.tokens, expected["G_SENTS_IDS"])
    torch.testing.assert_close(result.token_logprobs, expected["G_LOGP"], **LOGITS)
    # The reference leaves the trailing space of the last word's "</w>"; we strip it.
    assert get_tokenizer().decode_batch(result.tokens) == [s.strip() for s in expected["sentences"]]


def test_spatial_table_is_the_reference_sincos(reference_dir):
    state = torch.load(reference_dir / "ref_state.pt", map_location="cpu", weights_only=True)
    table = state["video_embed.embeddings_st_pos.spatial_pos_embed.weight"]
    torch.testing.assert_close(sincos_2d(14, 64, 160 / 224), table, atol=1e-6, rtol=0)
