"""The papers' metrics: accuracy@k, retrieval recall@K, caption metrics (pycocoevalcap), MLM accuracy."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence

import torch

SPICE_NOTE = "SPICE is not computed: it downloads Stanford CoreNLP at run time, which cannot work offline."


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Percent of rows whose label is among the k highest logits. logits (N, C), labels (N,)."""
    return top_accuracy(logits.topk(min(max(ks), logits.shape[1]), dim=1).indices, labels, ks)


def top_accuracy(top: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """:func:`topk_accuracy` from each row's highest-first class indices (N, kmax), kmax >= max(ks) or all classes."""
    hits = top == labels[:, None]
    return {f"acc@{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def average_views(probs: torch.Tensor, num_views: int) -> torch.Tensor:
    """Multi-view video protocol: (N * views, C) softmax probabilities, view-major per video -> (N, C)."""
    return probs.view(-1, num_views, probs.shape[-1]).mean(dim=1)


def _ranks(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Rank of each query's best positive: how many negatives score at least as high (ties count against).

    scores (Q, C); positives (Q, C) bool, at least one True per row. Returns (Q,) long, 0 = first.
    """
    best = scores.masked_fill(~positives, float("-inf")).max(dim=1, keepdim=True).values
    return ((scores >= best) & ~positives).sum(dim=1)


def retrieval_recall(similarity: torch.Tensor, text_to_item: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image/video-text retrieval in both directions, several captions per item.

    Args:
        similarity: (N items, M texts) similarity scores.
        text_to_item: (M,) the item index each text describes.

    Returns:
        ``i2t_R@k`` (an item is found when any of its texts ranks within k), ``t2i_R@k``, their means
        ``i2t_mean`` / ``t2i_mean`` and ``mean`` over all six, in percent. A tie with a wrong candidate
        counts against the query.
    """
    n, m = similarity.shape
    if text_to_item.shape != (m,):
        raise ValueError(f"text_to_item has shape {tuple(text_to_item.shape)}, expected ({m},)")
    pairs = text_to_item[None, :] == torch.arange(n, device=similarity.device)[:, None]  # (N, M)
    if not pairs.any(dim=1).all():
        raise ValueError("every item needs at least one text")
    out: dict[str, float] = {}
    for name, scores, positives in (("i2t", similarity, pairs), ("t2i", similarity.t(), pairs.t())):
        ranks = _ranks(scores.float(), positives)
        recalls = [100.0 * (ranks < k).float().mean().item() for k in ks]
        out.update({f"{name}_R@{k}": r for k, r in zip(ks, recalls, strict=True)})
        out[f"{name}_mean"] = sum(recalls) / len(recalls)
    out["mean"] = (out["i2t_mean"] + out["t2i_mean"]) / 2
    return out


def mlm_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of masked tokens predicted exactly. predicted and labels: token ids (M,) at masked positions."""
    return 100.0 * (predicted == labels).float().mean().item()


def caption_metrics(predictions: Mapping[str | int, str],
                    references: Mapping[str | int, Sequence[str]]) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr (x100) with pycocoevalcap and its PTB tokenizer (needs Java).

    ``predictions`` maps an id to one caption, ``references`` the same ids to their ground truths.
    SPICE is left out (see :data:`SPICE_NOTE`).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _tokenized(predictions, references)
    scores: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap's debugging output (see _tokenized)
        bleu, _ = Bleu(4).compute_score(gts, res)
        scores.update({f"BLEU-{n + 1}": 100.0 * b for n, b in enumerate(bleu)})
        for name, scorer in (("METEOR", Meteor()), ("ROUGE-L", Rouge()), ("CIDEr", Cider())):
            score, _ = scorer.compute_score(gts, res)
            scores[name] = 100.0 * float(score)
    return scores


def cider_per_caption(predictions: Mapping[str | int, str],
                      references: Mapping[str | int, Sequence[str]]) -> dict[str | int, float]:
    """Each id's own CIDEr-D (x100), the document frequencies those of all ``references``: their mean is
    :func:`caption_metrics`' CIDEr, so a bootstrap can resample them."""
    from pycocoevalcap.cider.cider import Cider

    gts, res = _tokenized(predictions, references)
    with contextlib.redirect_stdout(io.StringIO()):
        _, scores = Cider().compute_score(gts, res)
    return {i: 100.0 * float(score) for i, score in zip(gts, scores, strict=True)}


def _tokenized(predictions: Mapping[str | int, str],
               references: Mapping[str | int, Sequence[str]]) -> tuple[dict, dict]:
    """References and predictions by id as pycocoevalcap's scorers take them, PTB-tokenized. ValueError for a
    reference id without a prediction."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    missing = sorted(map(str, set(references) - set(predictions)))[:5]
    if missing:
        raise ValueError(f"no prediction for reference id(s) {', '.join(missing)}")
    ids = list(references)
    # pycocoevalcap prints debugging output ({'testlen': ...}, ratio: ...) where our commands print their
    # results: drop it. The PTB tokenizer's Java process reports on stderr; that stays, as it is the only
    # sign of a Java failure (the tokenizer ignores the exit code).
    with contextlib.redirect_stdout(io.StringIO()):
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
        res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in ids})
    return gts, res


def matthews_correlation(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Matthews correlation coefficient (CoLA's metric), in percent, of integer predictions and labels (N,), for
    any number of classes (the multiclass form, which is the usual one for two); 0 where it is undefined."""
    classes = int(max(predicted.max(), labels.max())) + 1 if len(labels) else 1
    confusion = torch.zeros(classes, classes, dtype=torch.float64)
    confusion.index_put_((labels.long(), predicted.long()), torch.ones(len(labels), dtype=torch.float64),
                         accumulate=True)
    t, p = confusion.sum(1), confusion.sum(0)  # true and predicted counts per class
    n, correct = confusion.sum(), confusion.trace()
    denominator = torch.sqrt((n**2 - (p * p).sum()) * (n**2 - (t * t).sum()))
    return 0.0 if float(denominator) == 0 else 100.0 * float((correct * n - (t * p).sum()) / denominator)


def binary_f1(predicted: torch.Tensor, labels: torch.Tensor, positive: int = 1) -> float:
    """F1 of the ``positive`` class (MRPC's and QQP's metric, beside accuracy), in percent; 0 with no true or
    predicted positive."""
    hits = int(((predicted == positive) & (labels == positive)).sum())
    guessed, actual = int((predicted == positive).sum()), int((labels == positive).sum())
    return 0.0 if hits == 0 else 100.0 * 2 * hits / (guessed + actual)
