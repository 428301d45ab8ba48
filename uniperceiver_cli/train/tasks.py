"""Training tasks: a recipe task's data, target set and loss. Batch in, weighted loss and metrics out."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from uniperceiver_cli.data.corpus import corpus_tokens
from uniperceiver_cli.data.loader import Batch, to_device, visual_input
from uniperceiver_cli.data.shards import Manifest, split_source
from uniperceiver_cli.model.config import EOT_ID
from uniperceiver_cli.model.tokenizer import get_tokenizer, label_word_ids
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.parallel.targets import TargetSplit, with_others
from uniperceiver_cli.task_types import TASKS, TaskType
from uniperceiver_cli.train.flops import StepShape
from uniperceiver_cli.train.losses import cross_entropy, retrieval_loss
from uniperceiver_cli.train.masking import whole_word_mask
from uniperceiver_cli.train.recipe import TaskSpec


@dataclass
class TrainTask:
    spec: TaskSpec
    kind: TaskType
    directory: str | Path  # a split folder, or an http(s) split URL
    manifest: Manifest
    class_names: list[str] | None = None
    vocab_ids: torch.Tensor | None = None  # the restricted target set ("corpus"), else None
    mixup: Any = None  # timm Mixup for soft-target classification
    split: TargetSplit | None = None  # several processes: large target sets encoded across them
    negatives: tuple[int, int] | None = None  # gather_negatives under several processes: (rank, world size)
    _label_text: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _device_cache: tuple[torch.device, dict[str, torch.Tensor | None]] | None = field(default=None, repr=False)
    _target_rows: tuple[int, int] = (0, 0)  # the last vocabulary target set: rows encoded here, rows in all
    shape: StepShape | None = field(default=None, repr=False)  # what the last micro-step encoded (train/flops.py)

    @classmethod
    def build(cls, spec: TaskSpec, data_root: Path, split: TargetSplit | None = None,
              world: tuple[int, int] = (0, 1)) -> TrainTask:
        """The task of ``spec``; ``world`` is this process's (rank, world size)."""
        directory = split_source(data_root, spec.data)
        manifest = Manifest.load(directory)
        if spec.type not in manifest.tasks:
            raise ValueError(f"task {spec.name}: {directory} serves {', '.join(manifest.tasks)}, not {spec.type}")
        negatives = world if spec.gather_negatives and world[1] > 1 else None
        task = cls(spec, TASKS[spec.type], directory, manifest, split=split, negatives=negatives)
        if task.kind.family in ("classification", "vqa"):
            task.class_names = manifest.label_names(spec.label_set)
            task._label_text = get_tokenizer().encode_batch(task.class_names)
            if spec.mixup is not None:
                from timm.data import Mixup

                m = spec.mixup
                task.mixup = Mixup(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.prob,
                                   switch_prob=m.switch_prob, mode=m.mode, label_smoothing=m.label_smoothing,
                                   num_classes=len(task.class_names))
        elif task.kind.family in ("caption", "mlm") and spec.vocabulary == "corpus":
            task.vocab_ids = corpus_tokens(directory, manifest)
        elif task.kind.family == "text_classification":
            task.class_names = manifest.label_names(spec.label_set)
            try:
                task.vocab_ids = torch.tensor(label_word_ids(task.class_names))
            except ValueError as e:
                raise ValueError(f"task {spec.name}: {e}") from None
        return task

    @property
    def answers(self) -> list[str]:
        """A VQA task's answer set (its split's classes), which its loader needs; empty for other tasks."""
        return list(self.class_names or []) if self.kind.family == "vqa" else []

    @staticmethod
    def record_targets(model: UniPerceiver, tasks: Iterable[TrainTask]) -> UniPerceiver:
        """Note on ``model`` what a run's tasks trained it over, for its bundle and later evaluations; returns it.

        ``class_names``: a classifier prompt's row i scored class i of every classification task, so its rows
        have names when those tasks share one list of ``classifier_classes`` names (else None). With no
        classification task, the rows and their names are as the model came.
        ``caption_vocabulary``: the caption tasks' corpus target sets, when every caption task trained on its
        corpus; None (the whole vocabulary) when one trained on all or sampled tokens.
        """
        tasks = list(tasks)
        lists = {tuple(t.class_names) for t in tasks if t.class_names is not None and t.kind.family == "classification"}
        if lists and model.config.prompt.classifier_classes:
            names = next(iter(lists))
            fits = len(lists) == 1 and len(names) == model.config.prompt.classifier_classes
            model.class_names = list(names) if fits else None
        captions = [t for t in tasks if t.kind.family == "caption"]
        if captions:
            corpus = [t.vocab_ids for t in captions if t.vocab_ids is not None]
            model.caption_vocabulary = torch.cat(corpus).unique() if len(corpus) == len(captions) else None
        return model

    # ----------------------------------------------------------------------------------------- losses
    def loss(self, model: UniPerceiver, batch: Batch, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """The task's loss times its loss weight, and metrics for the log (kept on device until read). The model
        routes as this task (task routing)."""
        with model.routing_task(self.spec.name):
            return self._loss(model, batch, generator)

    def _loss(self, model: UniPerceiver, batch: Batch, generator: torch.Generator | None
              ) -> tuple[torch.Tensor, dict[str, float]]:
        device = model.device
        family = self.kind.family
        if family == "classification":
            loss, metrics = self._classification(model, batch, device)
        elif family == "retrieval":
            query, text = model.retrieval_features(visual_input(batch, device), to_device(batch["text_ids"], device),
                                                   _padding(batch["text_padding"], device))
            logits, t2i = self.retrieval_logits(model, query, text)
            loss, metrics = retrieval_loss(logits, self.spec.label_smoothing, t2i), {}
            self.shape = StepShape("retrieval", logits.shape[0], _frames(batch.get("videos", batch.get("images"))),
                                   text=batch["text_ids"].shape[1])
        elif family == "caption":
            loss, metrics = self._caption(model, batch, device, generator)
        elif family == "text_classification":
            loss, metrics = self._cloze(model, batch, device)
        elif family == "vqa":
            loss, metrics = self._vqa(model, batch, device)
        else:
            loss, metrics = self._mlm(model, batch, device, generator)
        return loss * self.spec.loss_weight, metrics

    def retrieval_logits(self, model: UniPerceiver, query: torch.Tensor, text: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image-to-text logits (B, B') and, with gathered negatives, text-to-image logits (B, B'); each against
        this process's pairs first, then every other process's (None: the transpose, in-batch negatives)."""
        if self.negatives is None:
            return model.head.logits(query, text, "retrieve"), None
        rank, world_size = self.negatives
        return (model.head.logits(query, with_others(text, rank, world_size), "retrieve"),
                model.head.logits(text, with_others(query, rank, world_size), "retrieve"))

    def _on(self, model: UniPerceiver) -> dict[str, torch.Tensor | None]:
        """What every step of the task uses, on the model's device, copied there once: the class names' ids and
        padding; the vocabulary target set's token ids and the map from token id to row (full and corpus)."""
        device, vocab_size = model.device, model.config.vocab_size
        if self._device_cache is None or self._device_cache[0] != device:
            cache = {}
            if self._label_text is not None:
                ids, padding = self._label_text
                cache["label_ids"], cache["label_padding"] = ids.to(device), _padding(padding, device)
            if self.kind.family == "text_classification":
                cache["label_words"] = self.vocab_ids.to(device)
            elif self.kind.family in ("caption", "mlm") and self.spec.vocabulary != "sampled":
                ids = torch.arange(vocab_size) if self.spec.vocabulary == "full" else self.vocab_ids
                cache["vocab_ids"], cache["vocab_rows"] = ids.to(device), _rows(ids, vocab_size).to(device)
            self._device_cache = device, cache
        return self._device_cache[1]

    def _classification(self, model: UniPerceiver, batch: Batch, device: torch.device):  # noqa: ANN202
        inputs, labels = visual_input(batch, device), to_device(batch["labels"], device)
        target: torch.Tensor = labels
        if self.mixup is not None and inputs.dim() == 4 and inputs.shape[0] % 2 == 0:
            inputs, target = self.mixup(inputs, labels)
        on = self._on(model)
        targets = self._encode(model.encode_text, on["label_ids"], on["label_padding"])  # re-encoded: it is learning
        logits = model.classification_logits(inputs, targets)
        loss = cross_entropy(logits, target, self.spec.label_smoothing)
        names = on["label_ids"].shape
        self.shape = StepShape("classification", inputs.shape[0], _frames(inputs), targets=self._here(names[0]),
                               target_tokens=names[1], target_rows=names[0])
        return loss, {"acc": (logits.argmax(-1) == labels).float().mean()}

    def _targets(self, model: UniPerceiver, used: torch.Tensor, device: torch.device,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The vocabulary target set's features and a map from token id to row (-1 when absent). ``used``: the
        batch's token ids on the host, the rows of a sampled set."""
        if self.spec.vocabulary == "sampled":  # the batch's own tokens plus sampled negatives: each process its own
            vocab_size = model.config.vocab_size
            negatives = torch.randint(0, vocab_size, (self.spec.negatives,), generator=generator)
            ids = torch.cat([used, negatives, torch.tensor([EOT_ID])]).unique()  # on the host: no device sync
            self._target_rows = (len(ids), len(ids))
            return model.vocabulary_targets(to_device(ids, device)), to_device(_rows(ids, vocab_size), device)
        on = self._on(model)  # full, corpus: the same set on every process
        rows = on["vocab_ids"].shape[0]
        self._target_rows = (self._here(rows), rows)
        return self._encode(model.vocabulary_targets, on["vocab_ids"]), on["vocab_rows"]

    def _here(self, rows: int) -> int:
        """The rows of a shared target set of ``rows`` this process encodes."""
        return rows if self.split is None else self.split.rows(rows)

    def _encode(self, encode: Any, *rows: torch.Tensor) -> torch.Tensor:
        """A target set shared by every process: split across them when it is large (:class:`TargetSplit`)."""
        return encode(*rows) if self.split is None else self.split.encode(encode, *rows)

    def _caption(self, model: UniPerceiver, batch: Batch, device: torch.device,
                 generator: torch.Generator | None):  # noqa: ANN202
        used = batch["text_ids"][~batch["text_padding"]] if self.spec.vocabulary == "sampled" else None
        ids, padding = to_device(batch["text_ids"], device), to_device(batch["text_padding"], device)
        vocabulary, rows = self._targets(model, used, device, generator)
        logits = model.caption_logits(visual_input(batch, device), ids, padding, vocabulary)  # (B, n, K)
        target = rows[ids].masked_fill(padding, -1)
        loss = cross_entropy(logits.flatten(0, 1), target.flatten(), self.spec.label_smoothing)
        here, width = self._target_rows
        self.shape = StepShape("caption", ids.shape[0], _frames(batch.get("videos", batch.get("images"))),
                               text=ids.shape[1], targets=here, target_tokens=2, target_rows=width)
        valid = target != -1
        hits = (logits.argmax(-1) == target) & valid
        return loss, {"acc": hits.sum() / valid.sum().clamp(min=1)}

    def _mlm(self, model: UniPerceiver, batch: Batch, device: torch.device,
             generator: torch.Generator | None):  # noqa: ANN202
        ids, padding = batch["text_ids"], batch["text_padding"]  # masked on the host (train/masking.py)
        masked, labels = whole_word_mask(ids, padding, probability=self.spec.mask_probability,
                                         vocab_size=model.config.vocab_size, generator=generator)
        positions = (labels.flatten() != -1).nonzero().squeeze(1)  # the scored tokens: their count is known here
        chosen = labels.flatten()[positions]
        vocabulary, rows = self._targets(model, chosen, device, generator)
        logits = model.mlm_logits(to_device(masked, device), _padding(padding, device),
                                  to_device(positions, device), vocabulary)
        target = rows[to_device(chosen, device)]
        loss = cross_entropy(logits, target, self.spec.label_smoothing)
        here, width = self._target_rows
        self.shape = StepShape("mlm", ids.shape[0], text=ids.shape[1], targets=here, target_tokens=2,
                               target_rows=width, scored=len(positions))
        return loss, {"acc": (logits.argmax(-1) == target).float().mean()}

    def _cloze(self, model: UniPerceiver, batch: Batch, device: torch.device):  # noqa: ANN202
        """Text classification: each prompt's <|spe|> slot against the label words (re-encoded: they are
        learning), label-smoothed cross entropy as the reference's GLUE fine-tuning."""
        ids, labels = batch["text_ids"], batch["labels"]
        words = model.vocabulary_targets(self._on(model)["label_words"])
        if bool(((labels < 0) | (labels >= words.shape[0])).any()):  # host tensors: a shard's label, never a sync
            raise ValueError(f"task {self.spec.name}: a label is outside the {words.shape[0]} label words "
                             f"({', '.join(self.class_names or [])})")
        labels = to_device(labels, device)
        logits = model.cloze_logits(to_device(ids, device), _padding(batch["text_padding"], device),
                                    to_device(batch["slots"], device), words)
        loss = cross_entropy(logits, labels, self.spec.label_smoothing)
        self.shape = StepShape("mlm", ids.shape[0], text=ids.shape[1], targets=words.shape[0], target_tokens=2,
                               target_rows=words.shape[0], scored=ids.shape[0])
        return loss, {"acc": (logits.argmax(-1) == labels).float().mean()}

    def _vqa(self, model: UniPerceiver, batch: Batch, device: torch.device):  # noqa: ANN202
        """VQA: each question's slot against the answer set (re-encoded: it is learning), with cross entropy on the
        drawn answer (label-smoothed) or on the scores normalised into a distribution ("soft"). ``acc`` is the
        score of the predicted answer, the training estimate of the VQA accuracy."""
        on = self._on(model)
        answers = self._encode(model.answer_features, on["label_ids"], on["label_padding"])
        ids, scores = batch["text_ids"], to_device(batch["answer_scores"], device)
        logits = model.vqa_logits(visual_input(batch, device), to_device(ids, device),
                                  _padding(batch["text_padding"], device), to_device(batch["slots"], device), answers)
        if self.spec.answer_targets == "soft":
            loss = cross_entropy(logits, scores / scores.sum(dim=1, keepdim=True))
        else:
            loss = cross_entropy(logits, to_device(batch["labels"], device), self.spec.label_smoothing)
        rows, tokens = on["label_ids"].shape
        self.shape = StepShape("vqa", ids.shape[0], 1, text=ids.shape[1], targets=self._here(rows),
                               target_tokens=tokens, target_rows=rows)
        return loss, {"acc": scores.gather(1, logits.argmax(-1, keepdim=True)).mean()}


def _frames(pixels: torch.Tensor) -> int:
    """Frames per sample of an image (B, 3, S, S) or video (B, T, 3, S, S) batch."""
    return pixels.shape[1] if pixels.dim() == 5 else 1


def _padding(padding: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """A host padding mask on ``device``; None when nothing is padded (read on the host), so attention runs
    without a mask and flash kernels can serve it."""
    return to_device(padding, device) if padding.any() else None


def _rows(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The map from token id to the row of ``ids`` holding it, -1 for the ids not among them. (vocab_size,)"""
    rows = torch.full((vocab_size,), -1, dtype=torch.long)
    rows[ids] = torch.arange(len(ids))
    return rows
