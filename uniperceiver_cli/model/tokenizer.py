"""CLIP byte-level BPE text tokenizer with the reference's five special tokens.

The vocabulary is CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (read from the installed ``open_clip`` package):
256 byte tokens, the same 256 with ``</w>``, the merges, then ``<|startoftext|>``, ``<|endoftext|>``,
``<|mask|>``, ``<|gen|>`` and ``<|spe|>`` (``SOT_ID`` to ``SPE_ID``, model/config.py).

The BPE itself runs in HuggingFace ``tokenizers``; only the reference's text cleanup (ftfy, double HTML
unescape, whitespace collapse, lower case) runs in Python. The reference encodes every text as
``text + " <|endoftext|>"`` with no start token; ``Tokenizer.encode`` does the same by default.

torch is imported only by the methods that return tensors, so a runtime without torch can build
``Tokenizer(path)`` from a copy of the merges file (``bpe_path()`` says where the original lies), encode
and decode.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import ftfy
import regex
from tokenizers import AddedToken, Regex, pre_tokenizers
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from uniperceiver_cli.model.config import EOT_ID, GEN_ID, MASK_ID, SOT_ID, SPE_ID, VOCAB_SIZE

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "EOT_ID", "GEN_ID", "MASK_ID", "SOT_ID", "SPE_ID", "VOCAB_SIZE", "Tokenizer", "bpe_path", "get_tokenizer",
]

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # the reference keeps merge lines [1, 48895) of the file
_SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|mask|>", "<|gen|>", "<|spe|>")
# The reference's pre-tokenisation regex. It does not know <|mask|>: that text becomes ordinary BPE ids.
_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|<\|gen\|>|<\|spe\|>"
    r"|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
_TEXT_SPECIALS = {s: i for i, s in zip(range(SOT_ID, VOCAB_SIZE), _SPECIALS, strict=True) if s != "<|mask|>"}
# The reference regex only finds a special where a match can start; right after a punctuation character the
# punctuation run swallows its "<|" instead. The backend splits specials out anywhere, so texts with such
# a glued special take the slower exact path.
_GLUED_SPECIAL = regex.compile(r"[^\s\p{L}\p{N}](?:<\|startoftext\|>|<\|endoftext\|>|<\|gen\|>|<\|spe\|>)")
_WHITESPACE = regex.compile(r"\s+")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in printable]
    chars = printable + [256 + n for n in range(len(others))]
    return {b: chr(c) for b, c in zip(printable + others, chars, strict=True)}


def bpe_path() -> Path:
    """The CLIP merges file shipped with ``open_clip``, the default vocabulary of ``Tokenizer``."""
    # find_spec locates the package without importing it (importing open_clip takes seconds, and torch).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the CLIP merges file {BPE_FILE} comes with open_clip_torch; install it")
    return Path(next(iter(spec.submodule_search_locations))) / BPE_FILE


def _build_backend(path: str | Path | None) -> _Backend:
    path = Path(path) if path is not None else bpe_path()
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + [a + b for a, b in merges] + list(_SPECIALS)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{path} gives {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")

    backend = _Backend(BPE(vocab, merges, end_of_word_suffix="</w>", fuse_unk=False))
    # The pattern gets (?i) because the reference compiles it with IGNORECASE (it matters for e.g. "'ſ").
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("(?i)" + _PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _TEXT_SPECIALS])
    return backend


def _clean(text: str) -> str:
    """The reference's cleanup: ftfy, HTML unescape twice, collapse whitespace, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    text = _WHITESPACE.sub(" ", text).strip().lower()
    # U+0345 matches no branch of the reference regex under IGNORECASE, so the reference drops it like a
    # space; Oniguruma's case folding would count it as a letter.
    return text.replace("\u0345", " ")


def _truncate(ids: list[int], max_len: int | None) -> list[int]:
    if max_len is None or len(ids) <= max_len:
        return ids
    return ids[: max_len - 1] + ids[-1:]


def _check_max_len(max_len: int | None) -> None:
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")


class Tokenizer:
    """The reference's CLIP BPE tokenizer (``ClipTokenizer``) on a HuggingFace ``tokenizers`` backend.

    Args:
        bpe_path: The gzipped CLIP merges file; defaults to the copy shipped with ``open_clip``
            (``bpe_path()``), which is not looked for when a path is given.
    """

    def __init__(self, bpe_path: str | Path | None = None) -> None:
        self._backend = _build_backend(bpe_path)
        self.vocab_size: int = self._backend.get_vocab_size()

    @functools.cached_property
    def _plain_backend(self) -> _Backend:
        # A copy that leaves special-token text to the pre-tokenizer regex, as the reference does.
        backend = _Backend.from_str(self._backend.to_str())
        backend.encode_special_tokens = True
        return backend

    def _encode_glued(self, cleaned: str) -> list[int]:
        encoding = self._plain_backend.encode(cleaned, add_special_tokens=False)
        bpe_ids, tokens, word_ids = encoding.ids, encoding.tokens, encoding.word_ids
        ids: list[int] = []
        # Group the BPE tokens by pre-token; a pre-token that is exactly a special's text becomes its id.
        start = 0
        for end in range(1, len(word_ids) + 1):
            if end < len(word_ids) and word_ids[end] == word_ids[start]:
                continue
            special = _TEXT_SPECIALS.get("".join(tokens[start:end]).removesuffix("</w>"))
            ids.extend(bpe_ids[start:end] if special is None else [special])
            start = end
        return ids

    def _prepare(self, text: str, add_eot: bool) -> str:
        # The EOT goes into the text before cleanup, exactly as the reference writes text + " <|endoftext|>".
        return _clean(text + " <|endoftext|>" if add_eot else text)

    def encode(self, text: str, *, add_eot: bool = True, max_len: int | None = None) -> list[int]:
        """Encodes one text the way the reference does.

        Args:
            text: Raw text; it is cleaned and lower-cased first. ``<|spe|>``, ``<|endoftext|>``,
                ``<|startoftext|>`` and ``<|gen|>`` in it become their special ids.
            add_eot: Encode ``text + " <|endoftext|>"``, so the ids end with ``EOT_ID``.
            max_len: Keep at most this many ids: the first ``max_len - 1`` and then the last one, so a
                final EOT survives truncation.

        Returns:
            The token ids, with no start token.
        """
        _check_max_len(max_len)
        cleaned = self._prepare(text, add_eot)
        if _GLUED_SPECIAL.search(cleaned):
            ids = self._encode_glued(cleaned)
        else:
            ids = self._backend.encode(cleaned, add_special_tokens=False).ids
        return _truncate(ids, max_len)

    def encode_many(self, texts: Sequence[str], *, add_eot: bool = True, max_len: int | None = None) -> list[list[int]]:
        """Encodes several texts like ``encode``, in one call to the backend; no torch needed."""
        _check_max_len(max_len)
        cleaned = [self._prepare(text, add_eot) for text in texts]
        rows = [encoding.ids for encoding in self._backend.encode_batch(cleaned, add_special_tokens=False)]
        for i, text in enumerate(cleaned):
            if _GLUED_SPECIAL.search(text):
                rows[i] = self._encode_glued(text)
        return [_truncate(row, max_len) for row in rows]

    def encode_batch(self, texts: Sequence[str], *, add_eot: bool = True,
                     max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encodes several texts like ``encode`` (``max_len`` applies to each text before padding) and right-pads
        them to the longest.

        Returns:
            ``ids`` (B, L) int64, padded with 0, and ``padding`` (B, L) bool, True at the padded positions.
        """
        return pad_rows(self.encode_many(texts, add_eot=add_eot, max_len=max_len))

    def _decodable(self, ids: Sequence[int] | np.ndarray | torch.Tensor, stop_at_eot: bool) -> list[int]:
        if hasattr(ids, "ndim"):  # a tensor or an array, told from a list without importing torch
            if ids.ndim != 1:
                raise ValueError(f"expected a 1-D tensor or array of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if stop_at_eot and EOT_ID in ids:
            ids = ids[: ids.index(EOT_ID)]
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        return [i for i in ids if i < SOT_ID]

    @functools.cached_property
    def _token_bytes(self) -> list[bytes]:
        # The bytes of every non-special id; "</w>" stays as its four ASCII bytes, as in CLIP's decoder.
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        return [bytes(byte_of[c] for c in self._backend.id_to_token(i)) for i in range(SOT_ID)]

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor, *, stop_at_eot: bool = True,
               errors: str = "replace") -> str:
        """Turns BPE ids back into text, as CLIP's decoder does (``</w>`` becomes a space).

        Args:
            ids: Token ids, a sequence, a 1-D array or a 1-D tensor.
            stop_at_eot: Cut the ids at the first ``EOT_ID``.
            errors: What becomes of bytes that are not valid UTF-8 (byte tokens can split a character):
                "replace" turns them into U+FFFD, as the reference does; "ignore" drops them, for generated
                text, where a caption may end or jump in the middle of a character.

        Returns:
            The text without special tokens, stripped.
        """
        data = b"".join(self._token_bytes[i] for i in self._decodable(ids, stop_at_eot))
        return data.decode("utf-8", errors=errors).replace("</w>", " ").strip()

    def decode_batch(self, ids: Sequence[Sequence[int]] | np.ndarray | torch.Tensor, *, stop_at_eot: bool = True,
                     errors: str = "replace") -> list[str]:
        """Decodes several id sequences like ``decode``, one text per row: a sequence of id sequences, or a 2-D
        array or tensor (B, L) whose rows end in EOT or padding (``stop_at_eot`` also drops that padding)."""
        if hasattr(ids, "ndim") and ids.ndim != 2:
            raise ValueError(f"expected a 2-D tensor or array of ids, got shape {tuple(ids.shape)}")
        return [self.decode(row, stop_at_eot=stop_at_eot, errors=errors) for row in ids]

    def word_ends(self) -> torch.Tensor:
        """(vocab_size,) bool: True where a token ends a word (its BPE string ends in ``</w>``, or it is a
        special). Whole-word masking groups the sub-tokens of a word up to the next word end."""
        import torch

        return torch.tensor([self._backend.id_to_token(i).endswith("</w>") or i >= SOT_ID
                             for i in range(self.vocab_size)])


def pad_rows(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids right-padded with 0 to the longest: ``ids`` (B, L) int64 and ``padding`` (B, L) bool, True
    at the padded positions."""
    import torch

    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    length = int(lengths.max()) if rows else 0
    ids = torch.tensor([[*row, *[0] * (length - len(row))] for row in rows], dtype=torch.long)
    return ids.reshape(len(rows), length), torch.arange(length) >= lengths[:, None]


def cloze_ids(ids: list[int], max_len: int) -> list[int]:
    """A cloze prompt's token ids within ``max_len``, its first <|spe|> slot kept, as the reference cuts GLUE pairs:
    the slot and what follows it (ending in <|endoftext|>) to at most half, then the text before it to the rest.

    Raises:
        ValueError: the prompt holds no <|spe|> slot.
    """
    if SPE_ID not in ids:
        raise ValueError("a cloze prompt holds <|spe|> where its answer goes; this one has none")
    if len(ids) <= max_len:
        return ids
    slot = ids.index(SPE_ID)
    before, after = ids[:slot], ids[slot:]
    if len(after) > max_len // 2:
        after = after[:max(1, max_len // 2 - 1)] + after[-1:]  # the slot always stays
    return before[:max(0, max_len - len(after))] + after


def label_word_ids(words: Sequence[str]) -> list[int]:
    """The token id of each label word of a cloze task (text classification): each must be one BPE token, the
    vocabulary row its <|spe|> slot is scored against."""
    tokenizer = get_tokenizer()
    ids = []
    for word in words:
        tokens = tokenizer.encode(word, add_eot=False)
        if len(tokens) != 1:
            raise ValueError(f"label word {word!r} is {len(tokens)} tokens; a cloze answer must be one token")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {', '.join(map(repr, words))} repeat a token")
    return ids


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """Returns the shared tokenizer, built on the first call."""
    return Tokenizer()
