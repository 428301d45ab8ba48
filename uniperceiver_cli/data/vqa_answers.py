"""VQA answers as the official VQA v2 evaluation compares them: its normalisation (punctuation, number words,
articles, contractions) and its accuracy, by which an answer is right as far as at least 3 of the humans gave it,
averaged over the 10 sets of 9 of the 10 human answers; each answer's soft score (the converter's training
targets) is that accuracy."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, "(?!<=" included: a period not before a digit
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
# Apostrophes the annotators left out, put back (the official table).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def strip_punctuation(text: str) -> str:
    """The official ``processPunctuation``: a mark beside a space (or any, in a text with a number like 1,000) is
    removed, another becomes a space; a period not followed by a digit is removed."""
    out = text
    for mark in _PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or _COMMA_IN_NUMBER.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def normalise_words(text: str) -> str:
    """The official ``processDigitArticle``: lower case, number words to digits, no articles, contractions
    restored."""
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalise_answer(text: str) -> str:
    """A predicted answer as the official evaluation compares it."""
    return normalise_words(strip_punctuation(" ".join(text.split("\n")).replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official accuracy (0..1) of one predicted answer against a question's human answers (10 in VQA v2):
    for each human, min(1, the number of the other humans who gave the predicted answer / 3), averaged. The human
    answers are compared without punctuation when they differ, as in the official code. With one human answer
    (Visual Genome's) there is no other human: the accuracy is whether the prediction is that answer."""
    if not answers:
        raise ValueError("a question needs at least one human answer")
    predicted = normalise_answer(prediction)
    humans = [" ".join(a.split("\n")).replace("\t", " ").strip() for a in answers]
    if len(set(humans)) > 1:
        humans = [strip_punctuation(a) for a in humans]
    if len(humans) == 1:
        return float(humans[0] == predicted)
    return _leave_one_out(sum(a == predicted for a in humans), len(humans))


def _leave_one_out(matches: int, humans: int) -> float:
    """The official min(1, others / 3) averaged over the humans, ``matches`` of whom gave the answer."""
    return (matches * min(1.0, (matches - 1) / 3) + (humans - matches) * min(1.0, matches / 3)) / humans


def answer_scores(answers: Sequence[str]) -> dict[str, float]:
    """Each distinct human answer's soft score, the training targets of the soft-score mode and the weights of the
    single-class mode's draw: the official accuracy of predicting it, with every human answer normalised as a
    prediction is (so "Two" and "2" count as one answer, as the standard soft-score preprocessing counts them):
    0.3, 0.6, 0.9 and 1.0 for 1, 2, 3 and at least 4 of 10 humans; 1.0 for a lone answer."""
    normalised = [normalise_answer(a) for a in answers]
    counts = Counter(a for a in normalised if a)
    if len(normalised) == 1:
        return {answer: 1.0 for answer in counts}
    return {answer: _leave_one_out(count, len(normalised)) for answer, count in counts.items()}
