"""Evaluation runners: batches in, metrics and per-sample predictions out.

Each runner takes any iterable of loader batches (``uniperceiver_cli.data.loader``), so the training
loop can call the same code every N steps. Target sets (class names, the vocabulary) are encoded once
per evaluation. Given a ``ctx`` of several processes, each runner takes this process's share of the split and
gathers the per-sample outputs of all of them (:mod:`.gather`) before the metrics; the predictions list each
process's samples in turn.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from uniperceiver_cli.data.loader import visual_input
from uniperceiver_cli.data.vqa_answers import vqa_accuracy
from uniperceiver_cli.evaluate.gather import gather
from uniperceiver_cli.evaluate.metrics import (
    SPICE_NOTE,
    average_views,
    binary_f1,
    caption_metrics,
    matthews_correlation,
    mlm_accuracy,
    retrieval_recall,
    top_accuracy,
)
from uniperceiver_cli.model.config import SOT_ID, SPE_ID
from uniperceiver_cli.model.decoding import beam_search
from uniperceiver_cli.model.precision import autocast
from uniperceiver_cli.model.tokenizer import get_tokenizer, label_word_ids
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.text_files import prompted

if TYPE_CHECKING:
    from uniperceiver_cli.data.loader import Batch
    from uniperceiver_cli.parallel.context import Context


@dataclass
class EvalResult:
    task: str
    metrics: dict[str, float]
    num_samples: int
    predictions: list[dict[str, Any]] = field(default_factory=list)  # one per sample
    notes: list[str] = field(default_factory=list)


def _evaluating(model: UniPerceiver) -> torch.device:
    model.eval()
    return model.device


def label_features(model: UniPerceiver, names: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
    """Zero-shot class features (C, D): each name in every template ("a photo of a {}."), averaged over
    templates and renormalised. Without templates the bare names are encoded, as the reference does."""
    feats = torch.stack([model.encode_text(texts) for texts in prompted(names, templates)])
    return F.normalize(feats.float().mean(dim=0), dim=-1)


def _preview(names: Sequence[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _visual(batch: Batch, device: torch.device) -> tuple[torch.Tensor, int]:
    """A batch's images or videos on ``device``, and its views per sample."""
    return visual_input(batch, device), int(batch.get("num_views", 1))


@torch.inference_mode()
def run_classification(model: UniPerceiver, batches: Iterable[Batch], names: Sequence[str], *,
                       templates: Sequence[str] | None = None, truth_names: Sequence[str] | None = None,
                       precision: str = "auto", top_k: int = 5, task: str = "classification",
                       ctx: Context | None = None) -> EvalResult:
    """acc@1 / acc@k of image or video classification; videos average the softmax over their views.

    ``names`` are the candidate labels; ``truth_names`` (default: ``names``) name the data's label ids. With
    custom labels, a sample counts towards accuracy when its true class name is among the candidates (a
    warning says how many do); labels naming none of the data's classes, or data with no sample of theirs,
    are refused (ValueError), as nothing could be scored. A prompt-tuned classifier maps each name to its row
    (``UniPerceiver.classifier_rows``).
    """
    device = _evaluating(model)
    truth_names = list(truth_names or names)
    candidates = {name.lower() for name in names}
    if not any(name.lower() in candidates for name in truth_names):
        raise ValueError(f"none of the {len(names)} labels ({_preview(names)}) is a class of the data "
                         f"({_preview(truth_names)}): no sample could be scored")
    rows = model.classifier_rows(names)
    k = min(top_k, len(names))
    with autocast(device, precision):
        targets = label_features(model, names, templates)
        tops, all_labels, keys = [], [], []
        for batch in batches:
            inputs, views = _visual(batch, device)
            probs = model.classification_logits(inputs, targets, rows).float().softmax(dim=-1)
            if views > 1:
                probs = average_views(probs, views)
            tops.append(probs.topk(k, dim=1))
            all_labels.append(batch["labels"])
            keys.extend(batch["keys"])
    values = torch.cat([t.values for t in tops]).cpu() if tops else torch.empty(0, k)
    indices = torch.cat([t.indices for t in tops]).cpu() if tops else torch.empty(0, k, dtype=torch.long)
    labels = torch.cat(all_labels) if all_labels else torch.empty(0, dtype=torch.long)
    parts = gather((values, indices, labels, keys), ctx)
    values, indices, labels = (torch.cat([part[i] for part in parts]) for i in range(3))
    keys = [key for part in parts for key in part[3]]
    index = {name.lower(): i for i, name in enumerate(names)}
    truth = [truth_names[int(y)] if 0 <= int(y) < len(truth_names) else None for y in labels]
    target = torch.tensor([index.get(t.lower(), -1) if t is not None else -1 for t in truth], dtype=torch.long)
    scored = target >= 0
    if not scored.any():
        raise ValueError(f"none of the {len(keys)} evaluated samples is of a class among the {len(names)} labels "
                         f"({_preview(names)}): no sample could be scored")
    notes = []
    metrics = top_accuracy(indices[scored], target[scored], ks=sorted({1, k}))
    if not scored.all():
        notes.append(f"accuracy over the {int(scored.sum())} of {len(keys)} samples whose class is a candidate")
        warnings.warn(notes[-1], stacklevel=2)
    predictions = [{"key": key, "label": t,
                    "top": [{"label": names[int(i)], "prob": round(float(p), 6)} for p, i in zip(ps, ids, strict=True)]}
                   for key, t, ps, ids in zip(keys, truth, values.tolist(), indices.tolist(), strict=True)]
    return EvalResult(task, metrics, len(keys), predictions, notes)


@torch.inference_mode()
def run_retrieval(model: UniPerceiver, batches: Iterable[Batch], *, max_text_len: int = 50,
                  captions_per_item: int | None = None, precision: str = "auto", task: str = "retrieval",
                  ctx: Context | None = None) -> EvalResult:
    """R@1/5/10 and means, item-to-text and text-to-item, over every caption of every item (or its first
    ``captions_per_item``). Captions are cut to ``max_text_len`` tokens: 50 in the reference's pre-training,
    30 when fine-tuning."""
    device = _evaluating(model)
    tokenizer = get_tokenizer()
    items, texts, owners, keys = [], [], [], []
    with autocast(device, precision):
        for batch in batches:
            inputs, views = _visual(batch, device)
            feats = model.encode_video(inputs) if inputs.dim() == 5 else model.encode_image(inputs)
            if views > 1:
                feats = F.normalize(feats.float().view(-1, views, feats.shape[-1]).mean(1), dim=-1)
            for key, captions in zip(batch["keys"], batch["captions"], strict=True):
                captions = captions[:captions_per_item]
                owners.extend([len(keys)] * len(captions))
                texts.extend(captions)
                keys.append(key)
            items.append(feats.float())
        width = model.config.width
        text_feats = torch.empty(0, width, device=device)
        if texts:
            ids, padding = tokenizer.encode_batch(texts, max_len=max_text_len)
            text_feats = model.encode_text(ids, padding).float()
    item_feats = torch.cat(items) if items else torch.empty(0, width, device=device)
    if ctx is not None and ctx.world_size > 1:  # every process's features, on this device
        parts = gather((item_feats.cpu(), text_feats.cpu(), owners, keys, texts), ctx)
        item_feats = torch.cat([part[0] for part in parts]).to(device)
        text_feats = torch.cat([part[1] for part in parts]).to(device)
        owners, keys, texts, offset = [], [], [], 0
        for _, _, part_owners, part_keys, part_texts in parts:
            owners.extend(owner + offset for owner in part_owners)
            keys.extend(part_keys)
            texts.extend(part_texts)
            offset += len(part_keys)
    similarity = (item_feats @ text_feats.t()).cpu()
    metrics = retrieval_recall(similarity, torch.tensor(owners))
    best = similarity.argmax(dim=1)
    predictions = [{"key": key, "best_text": texts[int(j)], "correct": owners[int(j)] == i}
                   for i, (key, j) in enumerate(zip(keys, best, strict=True))]
    return EvalResult(task, metrics, len(keys), predictions)


@torch.inference_mode()
def run_captioning(model: UniPerceiver, batches: Iterable[Batch], *, beam_size: int = 2, max_len: int = 21,
                   len_penalty: float = 0.0, vocab_ids: torch.Tensor | None = None, precision: str = "auto",
                   task: str = "captioning", ctx: Context | None = None) -> EvalResult:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr of beam-search captions (cached decoding) against all references.

    ``vocab_ids`` restricts decoding to these token ids (with end-of-text), e.g. a model trained with a
    corpus-restricted target set (``model.caption_vocabulary``); by default every one of the 49,411 tokens is a
    candidate. Bytes of a character left incomplete are dropped from the captions. With several processes only the
    main one scores the gathered captions (METEOR runs Java); the others return no metrics."""
    device = _evaluating(model)
    tokenizer = get_tokenizer()
    predictions, references = {}, {}
    with autocast(device, precision):
        vocabulary, vocab_ids = model.caption_targets(vocab_ids)
        for batch in batches:
            inputs, views = _visual(batch, device)
            if views > 1:  # one (centre) view per video for captioning
                inputs = inputs[views // 2::views]
            result = beam_search(model, inputs, beam_size=beam_size, max_len=max_len, len_penalty=len_penalty,
                                 vocabulary=vocabulary, token_ids=vocab_ids, use_cache=model.decodes_with_cache)
            for key, caption, refs in zip(batch["keys"], tokenizer.decode_batch(result.tokens.cpu(), errors="ignore"),
                                          batch["captions"], strict=True):
                predictions[key], references[key] = caption, list(refs)
    parts = gather((predictions, references), ctx)
    predictions = {k: v for part, _ in parts for k, v in part.items()}
    references = {k: v for _, part in parts for k, v in part.items()}
    metrics = caption_metrics(predictions, references) if ctx is None or ctx.main else {}
    rows = [{"key": k, "caption": predictions[k], "references": references[k]} for k in predictions]
    return EvalResult(task, metrics, len(rows), rows, notes=[SPICE_NOTE])


def mask_tokens(ids: torch.Tensor, padding: torch.Tensor | None, probability: float, seed: int,
                keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a random ``probability`` of the real tokens (never end-of-text) by <|spe|>, the reference's
    mask token. Returns the masked ids and the selection (B, L) bool (at least one per row). Each row's draws come
    from ``seed`` and its sample key, so a sample is masked alike whatever its batch or process."""
    real = torch.ones_like(ids, dtype=torch.bool) if padding is None else ~padding
    real &= ids < SOT_ID
    seeds = np.array([zlib.crc32(f"{seed}/{key}".encode()) for key in keys], dtype=np.uint64)
    chosen = (_uniform(seeds, ids.shape[1]) < probability) & real
    first = real.float().argmax(dim=1)  # guarantee one masked token where the row has any
    has_real = real.any(dim=1)
    chosen[torch.arange(ids.shape[0])[has_real], first[has_real]] = True
    return ids.masked_fill(chosen, SPE_ID), chosen


def _uniform(seeds: np.ndarray, length: int) -> torch.Tensor:
    """Uniform draws in [0, 1), (rows, ``length``): entry (r, i) a hash of ``seeds[r]`` and ``i`` (splitmix64's
    mixer), so a row's draws do not depend on the batch or its padded length."""
    with np.errstate(over="ignore"):
        x = seeds[:, None] + np.arange(1, length + 1, dtype=np.uint64)[None] * np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) / 2.0**53)


@torch.inference_mode()
def run_mlm(model: UniPerceiver, batches: Iterable[Batch], *, probability: float = 0.15, seed: int = 0,
            vocab_ids: torch.Tensor | None = None, precision: str = "auto", task: str = "mlm",
            ctx: Context | None = None) -> EvalResult:
    """Masked-token accuracy with a seeded 15% token masking (every masked token becomes <|spe|>), over the whole
    vocabulary or only ``vocab_ids`` (with end-of-text), e.g. the corpus tokens a model's MLM task trained on."""
    device = _evaluating(model)
    predicted, labels, count = [], [], 0
    with autocast(device, precision):
        vocabulary, row_ids = model.caption_targets(vocab_ids)
        for batch in batches:
            ids, padding = batch["text_ids"], batch["text_padding"]
            masked, chosen = mask_tokens(ids, padding, probability, seed, batch["keys"])
            out = model.mlm_logits(masked.to(device), padding.to(device), chosen.to(device), vocabulary)
            best = out.argmax(dim=-1).cpu()
            predicted.append(best if row_ids is None else row_ids[best])
            labels.append(ids[chosen])
            count += ids.shape[0]
    empty = torch.empty(0, dtype=torch.long)
    parts = gather((torch.cat(predicted) if predicted else empty, torch.cat(labels) if labels else empty, count), ctx)
    target, count = torch.cat([part[1] for part in parts]), sum(part[2] for part in parts)
    accuracy = mlm_accuracy(torch.cat([part[0] for part in parts]), target)
    return EvalResult(task, {"masked_acc": accuracy, "masked_tokens": float(target.numel())}, count)


@torch.inference_mode()
def run_text_classification(model: UniPerceiver, batches: Iterable[Batch], words: Sequence[str], *,
                            precision: str = "auto", task: str = "text_classification",
                            ctx: Context | None = None) -> EvalResult:
    """Accuracy and Matthews correlation (and, with two label words, the F1 of the second) of cloze prompts: each
    prompt's <|spe|> slot scored against the label words (each one token) at the MLM scale."""
    device = _evaluating(model)
    predicted, labels, keys = [], [], []
    with autocast(device, precision):
        targets = model.vocabulary_targets(torch.tensor(label_word_ids(words), device=device))
        for batch in batches:
            logits = model.cloze_logits(batch["text_ids"].to(device), batch["text_padding"].to(device),
                                        batch["slots"].to(device), targets)
            predicted.append(logits.argmax(dim=-1))
            labels.append(batch["labels"])
            keys.extend(batch["keys"])
    empty = torch.empty(0, dtype=torch.long)
    parts = gather((torch.cat(predicted).cpu() if predicted else empty, torch.cat(labels) if labels else empty,
                    keys), ctx)
    predicted, labels = torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])
    keys = [key for part in parts for key in part[2]]
    scored = (labels >= 0) & (labels < len(words))
    if not bool(scored.any()):
        raise ValueError(f"none of the {len(keys)} evaluated samples has a label among the {len(words)} label words")
    notes = []
    if not bool(scored.all()):
        notes.append(f"metrics over the {int(scored.sum())} of {len(keys)} samples whose label is a label word")
        warnings.warn(notes[-1], stacklevel=2)
    metrics = {"accuracy": 100.0 * float((predicted[scored] == labels[scored]).double().mean()),
               "matthews": matthews_correlation(predicted[scored], labels[scored])}
    if len(words) == 2:
        metrics["f1"] = binary_f1(predicted[scored], labels[scored])
    predictions = [{"key": key, "label": words[int(y)] if 0 <= int(y) < len(words) else None,
                    "predicted": words[int(p)]} for key, y, p in zip(keys, labels, predicted, strict=True)]
    return EvalResult(task, metrics, len(keys), predictions, notes)


@torch.inference_mode()
def run_vqa(model: UniPerceiver, batches: Iterable[Batch], answers: Sequence[str], *, precision: str = "auto",
            task: str = "vqa", ctx: Context | None = None) -> EvalResult:
    """The official VQA accuracy (in percent, also per answer type where the data names them) of each question's
    best answer: its <|spe|> slot scored against the answer set, encoded once. A question without human answers is
    predicted but not scored (a note says how many)."""
    device = _evaluating(model)
    best, scores, types, keys = [], [], [], []
    with autocast(device, precision):
        targets = model.answer_features(answers)
        for batch in batches:
            logits = model.vqa_logits(visual_input(batch, device), batch["text_ids"].to(device),
                                      batch["text_padding"].to(device), batch["slots"].to(device), targets)
            chosen = [answers[i] for i in logits.argmax(dim=-1).tolist()]
            best.extend(chosen)
            scores.extend(vqa_accuracy(answer, given) if given else None
                          for answer, given in zip(chosen, batch["answers"], strict=True))
            types.extend(batch["answer_types"])
            keys.extend(batch["keys"])
    parts = gather((best, scores, types, keys), ctx)  # each process scores its questions; the scores travel
    best, scores, types, keys = ([x for part in parts for x in part[i]] for i in range(4))
    scored = [(score, kind) for score, kind in zip(scores, types, strict=True) if score is not None]
    if not scored:
        raise ValueError(f"none of the {len(keys)} evaluated questions has human answers to score against")
    notes = []
    if len(scored) < len(keys):
        notes.append(f"accuracy over the {len(scored)} of {len(keys)} questions with human answers")
        warnings.warn(notes[-1], stacklevel=2)
    metrics = {"vqa_accuracy": 100.0 * sum(score for score, _ in scored) / len(scored)}
    for kind in sorted({kind for _, kind in scored if kind}):
        of_kind = [score for score, k in scored if k == kind]
        metrics[f"vqa_accuracy/{kind}"] = 100.0 * sum(of_kind) / len(of_kind)
    predictions = [{"key": key, "answer": answer, "accuracy": None if score is None else round(score, 6)}
                   for key, answer, score in zip(keys, best, scores, strict=True)]
    return EvalResult(task, metrics, len(keys), predictions, notes)


def limited(batches: Iterable[Batch], max_samples: int | None) -> Iterator[Batch]:
    """Stop after about ``max_samples`` samples (whole batches)."""
    seen = 0
    for batch in batches:
        if max_samples is not None and seen >= max_samples:
            return
        seen += len(batch["keys"])
        yield batch
