"""Caption decoding: the key/value cache gives exactly what re-encoding the whole sequence gives."""

import pytest
import torch

import uniperceiver_cli as up
from uniperceiver_cli.model.decoding import beam_search

SIZE = 32


def _setup(preset, **overrides):
    torch.manual_seed(0)
    model = up.create_model(preset, image_size=SIZE, **overrides).eval()
    ids = torch.arange(400)
    with torch.no_grad():
        vocabulary = model.encode_text(torch.stack([ids, torch.full_like(ids, 49407)], 1))
    return model, vocabulary, torch.randn(3, 3, SIZE, SIZE)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("beam_size", [1, 2, 3])
def test_cache_equals_reencoding(preset, beam_size):
    model, vocabulary, images = _setup(preset)
    first = beam_search(model, images, beam_size=beam_size, max_len=6, vocabulary=vocabulary, eos_id=399)
    eos = int(first.tokens[0, 2])  # an end token the search will actually emit, so beams finish early
    kwargs = {"beam_size": beam_size, "max_len": 8, "vocabulary": vocabulary, "eos_id": eos,
              "keep_logits": True}
    cached = beam_search(model, images, use_cache=True, **kwargs)
    full = beam_search(model, images, use_cache=False, **kwargs)
    assert torch.equal(cached.tokens, full.tokens)
    assert (cached.tokens == eos).any()
    torch.testing.assert_close(cached.scores, full.scores, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(cached.token_logprobs, full.token_logprobs, atol=1e-5, rtol=1e-6)
    for a, b in zip(cached.step_logits, full.step_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)


def test_cache_with_deep_prompts_and_video():
    model, vocabulary, _ = _setup("tiny-moe", prompt={"deep_prompt_length": 3})
    with torch.no_grad():
        for block in model.blocks:
            block.prompt.normal_()
    video = torch.randn(2, 2, 3, SIZE, SIZE)
    cached = beam_search(model, video, beam_size=2, max_len=5, vocabulary=vocabulary, eos_id=399)
    full = beam_search(model, video, beam_size=2, max_len=5, vocabulary=vocabulary, eos_id=399, use_cache=False)
    assert torch.equal(cached.tokens, full.tokens)
    torch.testing.assert_close(cached.scores, full.scores, atol=1e-5, rtol=1e-6)


def test_finished_beams_keep_their_score_and_emit_only_eos():
    model, vocabulary, images = _setup("tiny")
    first = beam_search(model, images, beam_size=2, max_len=4, vocabulary=vocabulary, eos_id=399)
    eos = int(first.tokens[0, 1])
    result = beam_search(model, images, beam_size=2, max_len=6, vocabulary=vocabulary, eos_id=eos)
    row = result.tokens[0]
    end = int((row == eos).nonzero()[0])
    assert (row[end:] == eos).all()
    assert (result.token_logprobs[0, end + 1:] == 0).all()
    torch.testing.assert_close(result.scores[0], result.token_logprobs[0].sum())


def test_greedy_is_the_argmax_chain():
    model, vocabulary, images = _setup("tiny")
    result = beam_search(model, images[:1], beam_size=1, max_len=3, vocabulary=vocabulary, eos_id=399,
                         keep_logits=True)
    for t, logits in enumerate(result.step_logits):
        assert int(logits.argmax()) == int(result.tokens[0, t])


def test_restricted_vocabulary_feeds_back_token_ids():
    """A restricted target set decodes exactly as teacher forcing scores: at every step the greedy choice's
    logits equal ``caption_logits`` on the chosen tokens, so the rows are fed back as their token ids."""
    model, _, images = _setup("tiny")
    token_ids = torch.cat([torch.arange(1000, 1399), torch.tensor([49407])])
    with torch.no_grad():
        vocabulary = model.encode_text(torch.stack([token_ids, torch.full_like(token_ids, 49407)], 1))
    result = beam_search(model, images, beam_size=1, max_len=5, vocabulary=vocabulary, token_ids=token_ids,
                         keep_logits=True)
    assert set(result.tokens.flatten().tolist()) <= set(token_ids.tolist())
    with torch.no_grad():
        forced = model.caption_logits(images, result.tokens, None, vocabulary)  # (B, steps, V)
    for t, logits in enumerate(result.step_logits):
        torch.testing.assert_close(logits, forced[:, t], atol=1e-4, rtol=1e-5)


def test_bad_arguments_fail_clearly():
    model, vocabulary, images = _setup("tiny")
    with pytest.raises(ValueError, match="at least 1"):
        beam_search(model, images, beam_size=0, vocabulary=vocabulary)
    with pytest.raises(ValueError, match="eos_id 49407 is not exactly one row of the 400-entry vocabulary"):
        beam_search(model, images, vocabulary=vocabulary)
    with pytest.raises(ValueError, match=r"token_ids has shape \(3,\), expected \(400,\)"):
        beam_search(model, images, vocabulary=vocabulary, token_ids=torch.arange(3))


def test_caption_api_returns_strings():
    model, _, images = _setup("tiny")
    captions = model.caption(images[:2], beam_size=2, max_len=3)
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)
