import json
import random
import unicodedata
from pathlib import Path

import pytest
import regex
import torch
from open_clip.tokenizer import SimpleTokenizer, basic_clean

from uniperceiver_cli.model.tokenizer import (
    EOT_ID,
    GEN_ID,
    MASK_ID,
    SOT_ID,
    SPE_ID,
    VOCAB_SIZE,
    Tokenizer,
    get_tokenizer,
)

SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|mask|>", "<|gen|>", "<|spe|>"]
REFERENCE_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|<\|gen\|>|<\|spe\|>"
    r"|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)

WORDS = [
    "a", "dog", "the", "left", "tench", "photograph", "running", "unbelievable", "Golden", "Retriever",
    "McDonald", "iPhone", "COVID-19", "e-mail", "state-of-the-art", "naïve", "café", "Zürich", "Ångström",
    "façade", "résumé", "straße", "ĳssel", "Москва", "привет", "мир", "東京タワー", "北京大学", "한국어",
    "こんにちは", "مرحبا", "بالعالم", "नमस्ते", "ελληνικά", "שלום", "ภาษาไทย", "İstanbul", "ǅemal", "ﬁne",
]  # fmt: skip
CONTRACTIONS = [
    "don't", "it's", "we're", "they've", "I'm", "you'll", "he'd", "DON'T", "It'S", "o'clock", "rock'n'roll",
    "'tis", "y'all", "won't've", "'S", "x'ſ",
]  # fmt: skip
NUMBERS = [
    "0", "7", "42", "3.14", "1,000,000", "2024", "1st", "90%", "$5", "٣٤", "²", "½", "Ⅻ", "１２３", "10⁶",
]  # fmt: skip
PUNCT = [
    ".", ",", "!", "?", "...", "!!!", "?!", "--", "—", "(", ")", "[...]", '"', "''", "``", "<>", "<|", "|>",
    "</w>", "@#$%", "~", "_", ":-)", "¿", "«", "»", "“", "”", "‘", "’", "&", ";", "#",
]  # fmt: skip
EMOJI = ["😀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "❤️", "🤖", "✨"]
ENTITIES = [
    "&amp;", "&amp;lt;", "&#39;", "&quot;", "&nbsp;", "&#x1F600;", "&eacute;", "&lt;b&gt;", "&amp;amp;",
    "&copy",
]  # fmt: skip
MOJIBAKE = ["cafÃ©", "Ã¼ber", "â€œquotedâ€\x9d", "itâ€™s", "dÃ©jÃ  vu", "seÃ±or", "ÐŸÑ€Ð¸Ð²ÐµÑ‚", "voilÃ"]
SEPARATORS = [" "] * 12 + ["", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2009", "\x1c", " \t "]
SPECIAL_PIECES = [
    *SPECIALS, "<|SPE|>", "<|ſpe|>", "!<|spe|>", ".<|endoftext|>", "'<|gen|>", "&amp;lt;|spe|&gt;",
]  # fmt: skip
PIECES = {
    "word": WORDS, "contraction": CONTRACTIONS, "number": NUMBERS, "punct": PUNCT, "emoji": EMOJI,
    "entity": ENTITIES, "mojibake": MOJIBAKE, "special": SPECIAL_PIECES,
}  # fmt: skip
CHAR_RANGES = [(0x20, 0x3000), (0x3000, 0x10000), (0x1F000, 0x2A000)]  # Latin to CJK, emoji, CJK extension B


def _random_char(rng: random.Random) -> str:
    # Only code points already assigned in Unicode 3.2, so the result does not depend on Unicode tables.
    while True:
        c = chr(rng.randrange(*rng.choice(CHAR_RANGES)))
        if unicodedata.ucd_3_2_0.category(c) not in ("Cn", "Cs"):
            return c


def _piece(rng: random.Random, specials: bool) -> str:
    kind = rng.choices(
        ["word", "contraction", "number", "punct", "emoji", "entity", "mojibake", "char", "special"],
        weights=[40, 6, 8, 12, 3, 3, 3, 6, 6 if specials else 0],
    )[0]
    if kind == "char":
        return "".join(_random_char(rng) for _ in range(rng.randint(1, 4)))
    text = rng.choice(PIECES[kind])
    return rng.choice([text, text, text, text.upper(), text.title()])


def _line(rng: random.Random, num_pieces: int, specials: bool) -> str:
    parts = []
    for _ in range(num_pieces):
        parts += [_piece(rng, specials), rng.choice(SEPARATORS)]
    return "".join(parts[:-1])


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """Mixed lines without the special tokens' text, so the plain open_clip tokenizer is a valid oracle."""
    rng = random.Random(20240611)
    lines = [_line(rng, rng.randint(1, 25), specials=False) for _ in range(2500)]
    return lines + [_line(rng, rng.randint(500, 1500), specials=False) for _ in range(6)] + ["", " ", "\t\n"]


@pytest.fixture(scope="module")
def special_corpus() -> list[str]:
    """Lines with special tokens, also glued to punctuation, where only the reference rules apply."""
    rng = random.Random(7)
    return [_line(rng, rng.randint(1, 12), specials=True) for _ in range(600)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return get_tokenizer()


@pytest.fixture(scope="module")
def open_clip_tok() -> SimpleTokenizer:
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def reference_tok() -> SimpleTokenizer:
    """open_clip's tokenizer set up as the reference ``ClipTokenizer``: its 5 specials, regex and cleanup."""
    ref = SimpleTokenizer()
    vocab = [ref.decoder[i] for i in range(SOT_ID)] + SPECIALS
    ref.encoder = {token: i for i, token in enumerate(vocab)}
    ref.decoder = dict(enumerate(vocab))
    ref.cache = {s: s for s in SPECIALS}
    ref.pat = regex.compile(REFERENCE_PATTERN, regex.IGNORECASE)
    ref.clean_fn = lambda text: regex.sub(r"\s+", " ", basic_clean(text)).strip().lower()
    return ref


def test_constants_and_vocab_size(tok: Tokenizer) -> None:
    assert (SOT_ID, EOT_ID, MASK_ID, GEN_ID, SPE_ID, VOCAB_SIZE) == (49406, 49407, 49408, 49409, 49410, 49411)
    assert tok.vocab_size == VOCAB_SIZE
    assert get_tokenizer() is tok


def test_matches_open_clip(tok: Tokenizer, open_clip_tok: SimpleTokenizer, corpus: list[str]) -> None:
    for text in corpus:
        assert tok.encode(text, add_eot=False) == open_clip_tok.encode(text), text


def test_open_clip_plus_eot(tok: Tokenizer, open_clip_tok: SimpleTokenizer, corpus: list[str]) -> None:
    # The EOT goes into the text before cleanup, as in the reference, and ftfy looks at the whole text: the
    # "<" of " <|endoftext|>" stops its HTML unescaping, and "Ã " at the end reads as mojibake of "à ". Texts
    # with neither are exactly open_clip's ids plus EOT.
    texts = [t for t in corpus if "&" not in t and not t.rstrip().endswith("Ã")]
    assert len(texts) > 1000
    ids, padding = tok.encode_batch(texts)
    for text, row, pad in zip(texts, ids.tolist(), padding.tolist(), strict=True):
        assert row[: pad.count(False)] == open_clip_tok.encode(text) + [EOT_ID], text


def test_matches_reference(
    tok: Tokenizer, reference_tok: SimpleTokenizer, corpus: list[str], special_corpus: list[str]
) -> None:
    texts = corpus + special_corpus
    assert sum("<|spe|>" in t.lower() for t in special_corpus) > 50
    ids, padding = tok.encode_batch(texts)
    for text, row, pad in zip(texts, ids.tolist(), padding.tolist(), strict=True):
        expected = reference_tok.encode(text + " <|endoftext|>")
        assert row[: pad.count(False)] == expected, text
    for text in special_corpus:
        assert tok.encode(text) == reference_tok.encode(text + " <|endoftext|>"), text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tench", [1149, 634, EOT_ID]),
        (".", [269, EOT_ID]),
        ("a", [320, EOT_ID]),
        ("dog", [1929, EOT_ID]),
        ("left", [1823, EOT_ID]),
        ("<|spe|>", [SPE_ID, EOT_ID]),
        ("<|SPE|>", [SPE_ID, EOT_ID]),
        ("<|endoftext|>", [EOT_ID, EOT_ID]),
        ("<|startoftext|>", [SOT_ID, EOT_ID]),
        ("<|gen|>", [GEN_ID, EOT_ID]),
        ("", [EOT_ID]),
        ("  \t\n ", [EOT_ID]),
    ],
)
def test_known_ids(tok: Tokenizer, text: str, expected: list[int]) -> None:
    assert tok.encode(text) == expected


def test_special_text_edge_cases(tok: Tokenizer, reference_tok: SimpleTokenizer) -> None:
    mask = tok.encode("<|mask|>", add_eot=False)
    assert len(mask) == 5 and all(i < SOT_ID for i in mask)
    assert tok.encode("<|spe|><|gen|>x", add_eot=False) == [SPE_ID, GEN_ID, 343]
    # After punctuation the reference regex reads "!<|" as one punctuation run: no special id.
    glued = tok.encode("hi!<|spe|>", add_eot=False)
    assert SPE_ID not in glued and glued == tok.encode("hi!<|spe |>", add_eot=False)
    assert tok.encode("&amp;lt;|spe|&amp;gt;", add_eot=False) == [SPE_ID]  # two rounds of unescaping
    cases = ["hi!<|spe|><|spe|> a<|spe|>b 'ſ <|ſpe|> x\u0345y 'S", "é.<|endoftext|>ü", "voilÃ", "dÃ©jÃ "]
    for text in cases:
        assert tok.encode(text) == reference_tok.encode(text + " <|endoftext|>"), text


def test_eot_text_is_cleaned_with_the_text(tok: Tokenizer) -> None:
    # ftfy leaves HTML entities alone in text that contains "<", such as " <|endoftext|>".
    assert tok.encode("caf&EACUTE;", add_eot=False) == tok.encode("café", add_eot=False)
    assert tok.encode("caf&EACUTE;") != tok.encode("café")
    assert tok.encode("voilÃ") == tok.encode("voilà")


def test_reference_label_ids(tok: Tokenizer, reference_dir: Path) -> None:
    for name in ("image_labels_token_ids.json", "video_labels_token_ids.json"):
        labels = json.loads((reference_dir / "raw" / name).read_text())
        assert labels
        for label, ids in labels.items():
            assert tok.encode(label) == ids, label


def test_truncation_keeps_eot(tok: Tokenizer) -> None:
    text = " ".join(["a photograph of a golden retriever running on the beach"] * 10)
    full = tok.encode(text)
    assert len(full) > 30
    assert tok.encode(text, max_len=30) == full[:29] + [EOT_ID]
    assert tok.encode("a dog", max_len=30) == tok.encode("a dog")
    ids, padding = tok.encode_batch([text, "a dog"], max_len=30)
    assert ids.shape == (2, 30) and ids[0].tolist() == full[:29] + [EOT_ID]
    with pytest.raises(ValueError):
        tok.encode(text, max_len=0)


def test_encode_batch_padding(tok: Tokenizer) -> None:
    texts = ["a dog", "a photograph of a cat sitting on a mat", "", "!<|spe|> ok <|spe|>"]
    ids, padding = tok.encode_batch(texts)
    rows = [tok.encode(t) for t in texts]
    assert ids.dtype == torch.long and padding.dtype == torch.bool
    assert ids.shape == padding.shape == (4, max(len(r) for r in rows))
    for i, row in enumerate(rows):
        assert ids[i, : len(row)].tolist() == row
        assert not padding[i, : len(row)].any() and padding[i, len(row) :].all()
        assert (ids[i, len(row) :] == 0).all()
    empty_ids, empty_padding = tok.encode_batch([])
    assert empty_ids.shape == empty_padding.shape == (0, 0)


def test_decode_round_trip(tok: Tokenizer) -> None:
    sentences = ["a dog running on the beach", "two cats sitting on a red sofa", "a man riding a horse"]
    for sentence in sentences:
        assert tok.decode(tok.encode(sentence)) == sentence
        assert tok.decode(torch.tensor(tok.encode(sentence))) == sentence
    ids, _ = tok.encode_batch(sentences)
    assert tok.decode_batch(ids) == sentences
    assert tok.decode([320, 1929, EOT_ID, 2368]) == "a dog"
    assert tok.decode([320, 1929, EOT_ID, 2368], stop_at_eot=False) == "a dog cat"
    assert tok.decode([SPE_ID, 320, MASK_ID, 1929, EOT_ID]) == "a dog"


def test_decode_matches_open_clip(tok: Tokenizer, open_clip_tok: SimpleTokenizer) -> None:
    rng = random.Random(3)
    rows = [[rng.randrange(SOT_ID) for _ in range(rng.randint(1, 40))] for _ in range(300)]
    rows += [tok.encode("Zürich 東京 😀 naïve", add_eot=False)]
    for row, text in zip(rows, tok.decode_batch(rows), strict=True):
        assert text == tok.decode(row) == open_clip_tok.decode(row).strip()


def test_decode_can_drop_incomplete_characters(tok: Tokenizer) -> None:
    ids = tok.encode("a 東京 dog", add_eot=False)
    assert tok.decode(ids, errors="ignore") == tok.decode(ids) == "a 東京 dog"
    split = [*ids[:2], *ids[3:]]  # the first two bytes of 京 left out: its last one is not UTF-8 alone
    assert tok.decode(split) == "a 東\ufffd dog"  # as the reference decodes
    assert tok.decode(split, errors="ignore") == "a 東 dog"
    assert tok.decode_batch([split, ids], errors="ignore") == ["a 東 dog", "a 東京 dog"]
