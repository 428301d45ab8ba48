"""Whole-word masking for masked language modelling (the reference's BooksWiki task)."""

from __future__ import annotations

import torch

from uniperceiver_cli.model.config import SOT_ID, SPE_ID, VOCAB_SIZE
from uniperceiver_cli.model.tokenizer import get_tokenizer


def whole_word_mask(ids: torch.Tensor, padding: torch.Tensor | None, *, probability: float = 0.15,
                    vocab_size: int = VOCAB_SIZE, generator: torch.Generator | None = None,
                    word_ends: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``probability`` of the words: every sub-token of a chosen word becomes <|spe|> (80%), a random
    id (10%) or stays (10%), decided per word as the reference does. Runs on the host, on the loader's batch:
    the words per row and the masked count are data the device would otherwise hand back.

    Args:
        ids: (B, L) token ids on the CPU; padding (B, L) True at pads. Special tokens (EOT) are never masked.
        word_ends: (V,) bool, True for tokens that end a word (``Tokenizer.word_ends()``).

    Returns:
        The input ids (B, L) and the labels (B, L): the original id at masked tokens, -1 elsewhere. Every
        row with a real token has at least one masked word.
    """
    if word_ends is None:
        word_ends = get_tokenizer().word_ends()
    real = ids < SOT_ID
    if padding is not None:
        real &= ~padding
    b, length = ids.shape
    # A word starts at a real token whose predecessor ended a word (or is not a real token).
    ends = word_ends[ids] | ~real
    starts = real & torch.cat([torch.ones(b, 1, dtype=torch.bool), ends[:, :-1]], dim=1)
    word_index = starts.long().cumsum(dim=1) - 1  # (B, L): the word each token belongs to
    words = int(starts.sum(dim=1).max()) if b else 0
    draw = torch.rand(b, max(words, 1), generator=generator)
    chosen_word = draw < probability
    # Guarantee one masked word per row that has words: the first word with the lowest draw.
    count = starts.sum(dim=1)
    lowest = draw.masked_fill(torch.arange(draw.shape[1])[None] >= count[:, None], 2.0).argmin(1)
    chosen_word[torch.arange(b)[count > 0], lowest[count > 0]] = True
    kind = torch.rand(b, max(words, 1), generator=generator)
    index = word_index.clamp(min=0)
    masked = chosen_word.gather(1, index) & real
    token_kind = kind.gather(1, index)
    random_ids = torch.randint(0, vocab_size, (b, length), generator=generator)
    out = torch.where(masked & (token_kind < 0.8), torch.full_like(ids, SPE_ID), ids)
    out = torch.where(masked & (token_kind >= 0.8) & (token_kind < 0.9), random_ids, out)
    labels = torch.where(masked, ids, torch.full_like(ids, -1))
    return out, labels
