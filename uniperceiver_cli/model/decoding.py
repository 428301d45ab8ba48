"""Caption decoding: beam search (greedy is a beam of one) over the vocabulary target set.

With the key/value cache, the image is encoded once and each step runs only new tokens: the word chosen
at the previous step (appended to the cache) and the next <|spe|> query, in one two-token pass. Without
it, every step re-encodes the whole two-stream sequence; both give the same tokens and scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from uniperceiver_cli.model.config import EOT_ID, SPE_ID
from uniperceiver_cli.model.layers import KV
from uniperceiver_cli.model.moe import Routing

if TYPE_CHECKING:
    from uniperceiver_cli.model.uniperceiver import UniPerceiver

CAPTION_VISUAL = Routing(("caption_visual",))
CAPTION_TEXT = Routing(("caption_text",))


@dataclass
class Captions:
    tokens: torch.Tensor  # (B, steps) best beam per input, <|endoftext|> repeated after it ends
    token_logprobs: torch.Tensor  # (B, steps) log-probability of each chosen token (0 after the end)
    scores: torch.Tensor  # (B,) summed log-probability (before any length penalty)
    step_logits: list[torch.Tensor] = field(default_factory=list)  # per step (rows, V), when kept
    trace: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per step: beams, words, scores


class _Stepper:
    """Produces the query's output at each step, with or without the key/value cache."""

    def __init__(self, model: UniPerceiver, video: torch.Tensor, use_cache: bool) -> None:
        self.model, self.use_cache = model, use_cache
        self.prefix = model.visual_prefix(video)  # (B, P, D)
        self.cache: list[KV] | None = model.encode(self.prefix, routing=CAPTION_VISUAL)[1] if use_cache else None

    def reorder(self, rows: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cache]
        else:
            self.prefix = self.prefix.index_select(0, rows)

    def query(self, words: torch.Tensor) -> torch.Tensor:
        """words (N, t) chosen so far -> output of query t (N, D)."""
        model, (n, t), device = self.model, words.shape, words.device
        if self.use_cache:
            if t == 0:  # just query 0 at position 0
                x = model.embed_text(torch.full((n, 1), SPE_ID, device=device))
                structure = None
            else:  # [word t-1, query t]: the word sees the cache and itself, the query also the word
                ids = torch.stack([words[:, -1], torch.full_like(words[:, -1], SPE_ID)], dim=1)
                x = model.embed_text(ids, torch.arange(t - 1, t + 1, device=device))
                past = self.cache[0][0].shape[2]
                structure = torch.ones(2, past + 2, dtype=torch.bool, device=device)
                structure[0, -1] = False
            out, kv = model.encode(x, structure=structure, routing=CAPTION_TEXT, past=self.cache)
            if t > 0:  # keep the word's keys/values, not the query's
                self.cache = [(k[:, :, :-1], v[:, :, :-1]) for k, v in kv]
            return out[:, -1]
        return model.encode_two_stream(self.prefix, words, t + 1)[:, -1]  # words 0..t-1 and queries 0..t


@torch.inference_mode()
def beam_search(model: UniPerceiver, inputs: torch.Tensor, *, beam_size: int = 2, max_len: int = 21,
                eos_id: int = EOT_ID, len_penalty: float = 0.0, vocabulary: torch.Tensor | None = None,
                token_ids: torch.Tensor | None = None, use_cache: bool = True, keep_logits: bool = False) -> Captions:
    """Generate captions for images (B, 3, H, W) or videos (B, T, 3, H, W).

    At each step the query scores the vocabulary (cosine x caption temperature); log-softmax scores are
    added to the beam's and the best ``beam_size`` continuations over all beams are kept. A beam that
    emitted ``eos_id`` continues only with it, at unchanged score. The best beam is chosen by score,
    divided by (non-EOS tokens + 1) ** len_penalty when ``len_penalty`` > 0. Special tokens are not
    masked, as in the reference.

    ``vocabulary`` (V, D) defaults to the whole vocabulary's features, row i being token i. A restricted
    target set passes its features and ``token_ids`` (V,), the token id of each row: the chosen rows are
    fed back as those tokens, and ``Captions.tokens`` holds token ids either way.
    """
    if beam_size < 1 or max_len < 1:
        raise ValueError("beam_size and max_len must be at least 1")
    video = inputs if inputs.dim() == 5 else inputs[:, None]
    vocab = model.vocabulary_features() if vocabulary is None else vocabulary
    b, v, device = video.shape[0], vocab.shape[0], video.device
    if token_ids is None:
        token_ids = torch.arange(v, device=device)
    elif token_ids.shape != (v,):
        raise ValueError(f"token_ids has shape {tuple(token_ids.shape)}, expected ({v},): one id per vocabulary row")
    token_ids = token_ids.to(device)
    is_eos = token_ids == eos_id
    if int(is_eos.sum()) != 1:
        raise ValueError(f"eos_id {eos_id} is not exactly one row of the {v}-entry vocabulary")
    stepper = _Stepper(model, video, use_cache)
    words = torch.zeros(b, 0, dtype=torch.long, device=device)
    logprobs = torch.zeros(b, 0, device=device)
    scores = torch.zeros(b, device=device)
    eos_only = torch.where(is_eos, 0.0, float("-inf"))  # the log-probabilities of a beam that has ended
    result = Captions(words, logprobs, scores)
    for t in range(max_len):
        hidden = stepper.query(words)
        logits = model.head.logits(model.head.project(hidden), vocab, "caption")
        if keep_logits:
            result.step_logits.append(logits.float())
        logp = logits.float().log_softmax(dim=-1)
        if t > 0:
            logp = torch.where((words[:, -1] == eos_id)[:, None], eos_only, logp)
        beams = 1 if t == 0 else beam_size
        candidates = (scores[:, None] + logp).view(b, beams * v)
        top, index = candidates.topk(min(beam_size, beams * v), dim=1)  # (B, K)
        beam, row = index // v, index % v
        word = token_ids[row]
        rows = (torch.arange(b, device=device)[:, None] * beams + beam).flatten()
        chosen = logp[rows, row.flatten()]
        words = torch.cat([words[rows], word.flatten()[:, None]], dim=1)
        logprobs = torch.cat([logprobs[rows], chosen[:, None]], dim=1)
        scores = top.flatten()
        stepper.reorder(rows)
        if keep_logits:
            result.trace.append({"selected_beam": beam, "selected_words": word, "selected_logprob": top})
        if bool((word == eos_id).all()):
            break
    k = words.shape[0] // b
    final = scores.view(b, k)
    if len_penalty > 0:
        lengths = (words != eos_id).sum(dim=1).view(b, k) + 1
        final = final / lengths.float() ** len_penalty
    best = final.argmax(dim=1) + torch.arange(b, device=device) * k
    result.tokens, result.token_logprobs, result.scores = words[best], logprobs[best], scores[best]
    return result
