"""Run an exported model with onnxruntime alone: zero-shot classification, retrieval features, captions, text
classification as a cloze and visual question answering.

``uniperceiver export SRC --out DIR --onnx`` writes ``DIR/onnx/``: seven or eight graphs, the tokenizer's merges
file and ``uniperceiver-onnx.json`` (what the graphs need beside their weights: temperatures, the caption target
set, class names, the preprocessing size). This module reads that folder with numpy, PIL, ``tokenizers`` and
onnxruntime; it never imports torch. The graphs and their inputs:

- ``image_encoder``: images (B, 3, S, S) -> features (B, D) [and the classifier prompt's logits (B, C)]
- ``video_encoder``: clips (B, T, 3, S, S) -> features (B, D) [and (B, C)]
- ``text_encoder``: ids (B, L) int64 and padding (B, L) bool -> features (B, D)
- ``caption_prefix``: clips (B, T, 3, S, S) -> the keys/values of every layer (layers, 2, B, heads, P, head_dim)
- ``caption_step``: tokens (N, K), positions (K,) and that cache -> logits of the last token over the caption
  target set (N, V) and the keys/values of the first K - 1 tokens, to append to the cache.
- ``word_encoder``: ids (B, L) and padding (B, L) -> features (B, D) as word targets: label words, VQA answers
- ``cloze_encoder``: prompt ids (B, L), padding (B, L) and slots (B,) int64 -> the query feature (B, D) at each
  prompt's <|spe|> slot (text classification)
- ``vqa_encoder`` (dense models only): images (B, 3, S, S), question ids, padding and slots -> the query feature at
  each question's answer slot. An MoE model's VQA call routes the image and the question by two attribute rows in
  one pass, which a graph holding one row's dense weights cannot.

The last three are optional: a folder exported before they existed serves the first five's tasks.

Features are L2-normalised; logits are cosine similarity times the task's temperature, as in PyTorch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from uniperceiver_cli.model.class_rows import classifier_rows
from uniperceiver_cli.model.config import EOT_ID, SPE_ID, VOCAB_SIZE
from uniperceiver_cli.text_files import prompted, read_small

MANIFEST = "uniperceiver-onnx.json"
FORMAT = "uniperceiver-onnx"
FORMAT_VERSION = 1
GRAPHS = ("image_encoder", "video_encoder", "text_encoder", "caption_prefix", "caption_step")
TASK_GRAPHS = ("word_encoder", "cloze_encoder", "vqa_encoder")  # text classification and VQA; optional (doc above)
TOKENIZER_FILE = "bpe_simple_vocab_16e6.txt.gz"
MAX_MANIFEST = 8 << 20  # bytes: a larger manifest is refused unread


class OnnxModelError(ValueError):
    """An ONNX folder that cannot be used; the message is one line."""


def is_onnx_folder(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _inside(folder: Path, name: str) -> Path:
    """``folder / name``, refused when it resolves outside ``folder`` (a link out of it): the folder is a thing a user
    may be handed, and it is used only through its own files, as onnxruntime keeps a graph's external data."""
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise OnnxModelError(f"{path} links outside {folder}; an ONNX folder's files must be inside it")
    return path


def _count(meta: dict, key: str, high: int) -> int:
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ValueError(f"{key} must be an integer in [1, {high}], got {value!r}")
    return value


def _token_ids(meta: dict, key: str) -> list[int] | None:
    ids = meta.get(key)
    if ids is not None and (not isinstance(ids, list) or not ids or any(isinstance(i, bool) or not isinstance(i, int)
                                                                        or not 0 <= i < VOCAB_SIZE for i in ids)):
        raise ValueError(f"{key} must be a non-empty list of token ids in [0, {VOCAB_SIZE})")
    return ids


@dataclass
class Manifest:
    image_size: int
    max_frames: int
    max_text_len: int
    temperatures: dict[str, float]  # exp(logit_scale), capped, per temperature name
    caption_token_ids: list[int] | None  # the token id of each caption target row (None: row i is token i)
    trained_caption_token_ids: list[int] | None  # the tokens the caption task trained on, when recorded
    class_names: list[str] | None
    classifier_classes: int  # rows of the prompt-tuned classifier (0: none)
    similarity_weight: float

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = _inside(folder, MANIFEST)
        try:
            data = read_small(path, "manifest", MAX_MANIFEST)
        except FileNotFoundError:
            raise OnnxModelError(f"{folder} is not an exported ONNX folder (no {MANIFEST}; "
                                 f"write one with 'uniperceiver export SRC --out DIR --onnx')") from None
        except OSError as e:
            raise OnnxModelError(f"cannot read {path}: {e.strerror or e}") from None
        except ValueError:
            raise OnnxModelError(f"{path} is larger than {MAX_MANIFEST >> 20} MB, more than a manifest holds; not read"
                                 ) from None
        try:
            meta = json.loads(data)
        except (ValueError, RecursionError) as e:  # ValueError: JSON and unicode errors
            raise OnnxModelError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise OnnxModelError(f"{path} is not a {FORMAT} manifest")
        if meta.get("version") != FORMAT_VERSION:
            raise OnnxModelError(f"{path} has format version {meta.get('version')!r}; this toolkit reads "
                                 f"{FORMAT_VERSION}")
        try:
            temperatures = {str(k): float(v) for k, v in meta["temperatures"].items()}
            if not all(0 < v < math.inf for v in temperatures.values()):
                raise ValueError("temperatures must be positive and finite")
            names = meta["class_names"]
            if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
                raise ValueError("class_names must be a list of strings")
            classifier = meta["classifier"] or {}
            classes = int(classifier.get("classes", 0))
            weight = float(classifier.get("similarity_weight", 1.0))
            if not 0 <= classes <= 10**7 or not math.isfinite(weight):
                raise ValueError("the classifier record is out of range")
            return cls(_count(meta, "image_size", 8192), _count(meta, "max_frames", 4096),
                       _count(meta, "max_text_len", 65536), temperatures, _token_ids(meta, "caption_token_ids"),
                       _token_ids(meta, "trained_caption_token_ids"), names, classes, weight)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise OnnxModelError(f"{path} is malformed ({type(e).__name__}: {e})") from None


def _pad(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of token ids -> ids (B, L) int64 right-padded with 0 and padding (B, L) bool, as
    ``tokenizer.pad_rows`` (without torch)."""
    lengths = np.array([len(r) for r in rows])
    padding = np.arange(lengths.max())[None] >= lengths[:, None]
    ids = np.zeros(padding.shape, dtype=np.int64)
    ids[~padding] = np.concatenate(rows)  # row-major: each row's ids fill its unpadded prefix
    return ids, padding


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(x))


class OnnxModel:
    """An exported model on onnxruntime. Inputs are preprocessed float32 arrays (see
    :mod:`uniperceiver_cli.model.pixels`); each graph's session starts on first use."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = Manifest.read(self.folder)
        missing = [g for g in GRAPHS if not _inside(self.folder, f"{g}.onnx").is_file()]
        if missing or not _inside(self.folder, TOKENIZER_FILE).is_file():
            raise OnnxModelError(f"{self.folder} lacks {', '.join(f'{g}.onnx' for g in missing) or TOKENIZER_FILE}")
        self.threads = threads
        self._sessions: dict[str, Any] = {}

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        session = self._sessions.get(graph)
        if session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads or 0  # 0: onnxruntime's own choice, its default
            try:
                session = ort.InferenceSession(str(self.folder / f"{graph}.onnx"), options,
                                               providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own error types for bad graphs
                raise OnnxModelError(f"cannot load {self.folder / graph}.onnx: "
                                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            self._sessions[graph] = session
        try:
            return session.run(None, feeds)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own error types
            raise OnnxModelError(f"{self.folder / graph}.onnx cannot run on these inputs: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    @cached_property
    def tokenizer(self):  # noqa: ANN201 - the tokenizer module is imported on first use
        from uniperceiver_cli.model.tokenizer import Tokenizer

        return Tokenizer(self.folder / TOKENIZER_FILE)

    def _check_visual(self, inputs: np.ndarray) -> np.ndarray:
        inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        size = self.manifest.image_size
        if inputs.ndim not in (4, 5) or inputs.shape[-3:] != (3, size, size) or not len(inputs):
            raise ValueError(f"expected images (B, 3, {size}, {size}) or clips (B, T, 3, {size}, {size}), "
                             f"got shape {inputs.shape}")
        if inputs.ndim == 5 and not 1 <= inputs.shape[1] <= self.manifest.max_frames:
            raise ValueError(f"clips of {inputs.shape[1]} frames do not fit the model's {self.manifest.max_frames}")
        return inputs

    def _visual(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        inputs = self._check_visual(inputs)
        graph, name = ("video_encoder", "video") if inputs.ndim == 5 else ("image_encoder", "images")
        out = self._run(graph, {name: inputs})
        return out[0], (out[1] if len(out) > 1 else None)

    def encode_visual(self, inputs: np.ndarray) -> np.ndarray:
        """Images (B, 3, S, S) or clips (B, T, 3, S, S) -> L2-normalised features (B, D)."""
        return self._visual(inputs)[0]

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> ids (B, L) int64 right-padded with 0 and padding (B, L) bool, as ``Tokenizer.encode_batch``."""
        return _pad(self.tokenizer.encode_many(texts, max_len=self.manifest.max_text_len))

    def encode_tokens(self, ids: np.ndarray, padding: np.ndarray | None = None) -> np.ndarray:
        """Token ids (B, L) with padding (B, L, True at padded ids) -> L2-normalised target features (B, D)."""
        ids = np.asarray(ids, dtype=np.int64)
        padding = np.zeros(ids.shape, dtype=bool) if padding is None else np.asarray(padding, dtype=bool)
        if ids.ndim != 2 or padding.shape != ids.shape or not 1 <= ids.shape[1] <= self.manifest.max_text_len:
            raise ValueError(f"expected ids and padding (B, L) with L at most {self.manifest.max_text_len}, got "
                             f"shapes {ids.shape} and {padding.shape}")
        return self._run("text_encoder", {"ids": ids, "padding": padding})[0]

    def encode_text(self, texts: Sequence[str], chunk_size: int = 256) -> np.ndarray:
        """Texts (class names, captions) -> L2-normalised target features (B, D)."""
        if not texts:
            raise ValueError("no texts given")
        return np.concatenate([self.encode_tokens(*self.tokenize(texts[start:start + chunk_size]))
                               for start in range(0, len(texts), chunk_size)])

    def label_features(self, names: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """Class features (C, D): each name in every template, averaged and renormalised (bare names without)."""
        return _normalize(np.stack([self.encode_text(texts) for texts in prompted(names, templates)]).mean(axis=0))

    def classifier_rows(self, names: Sequence[str]) -> list[int] | None:
        return classifier_rows(self.manifest.class_names, self.manifest.classifier_classes, names)

    def classification_logits(self, inputs: np.ndarray, targets: np.ndarray,
                              rows: Sequence[int] | None = None) -> np.ndarray:
        """Visual inputs against class features (C, D) -> (B, C), with a prompt-tuned classifier's logits added."""
        query, classifier = self._visual(inputs)
        scale = self.manifest.temperatures["video_cls" if inputs.ndim == 5 else "img_cls"]
        logits = query @ targets.T.astype(np.float32) * np.float32(scale)
        if classifier is not None:
            prompt = classifier if rows is None else classifier[:, list(rows)]
            if prompt.shape[-1] != logits.shape[-1]:
                raise ValueError(f"the classifier prompt scores its {classifier.shape[-1]} classes by position; "
                                 f"got {logits.shape[-1]} targets")
            logits = np.float32(self.manifest.similarity_weight) * logits + prompt
        return logits

    def classify(self, inputs: np.ndarray, names: Sequence[str],
                 templates: Sequence[str] | None = None) -> np.ndarray:
        """Zero-shot class probabilities (B, C) of images or clips over class names."""
        rows = self.classifier_rows(names)
        return softmax(self.classification_logits(inputs, self.label_features(names, templates), rows))

    def require_graph(self, graph: str) -> str:
        """``graph``, one of :data:`TASK_GRAPHS`, when the folder has it; else a one-line error saying why not."""
        if not _inside(self.folder, f"{graph}.onnx").is_file():
            moe = graph == "vqa_encoder" and _inside(self.folder, "word_encoder.onnx").is_file()  # the others there
            why = ("its model is a mixture of experts: a VQA call routes the image and the question by two attribute "
                   "rows in one pass, and a graph holds one row's dense weights; answer questions with the PyTorch "
                   "bundle" if moe else "it was exported before that graph existed; export the model again")
            raise OnnxModelError(f"{self.folder} has no {graph}.onnx: {why}")
        return graph

    def encode_words(self, texts: Sequence[str]) -> np.ndarray:
        """Label words or VQA answers -> L2-normalised features (B, D), encoded as word targets."""
        if not texts:
            raise ValueError("no texts given")
        ids, padding = self.tokenize(texts)
        return self._run(self.require_graph("word_encoder"), {"ids": ids, "padding": padding})[0]

    def _prompts(self, prompts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
        """Cloze prompts -> the ids, padding and slot of each, cut around the slot as the PyTorch model does."""
        from uniperceiver_cli.model.tokenizer import cloze_ids

        limit = min(max_len, self.manifest.max_text_len)
        ids, padding = _pad([cloze_ids(self.tokenizer.encode(prompt), limit) for prompt in prompts])
        return {"ids": ids, "padding": padding, "slots": (ids == SPE_ID).argmax(axis=1).astype(np.int64)}

    def classify_text(self, prompts: Sequence[str], words: Sequence[str], *, max_len: int = 256) -> np.ndarray:
        """Text classification as a cloze: the probabilities (N, C) of the label ``words`` (one token each) at each
        prompt's <|spe|> slot, as ``UniPerceiver.classify_text``."""
        from uniperceiver_cli.model.tokenizer import label_word_ids

        targets = self._run(self.require_graph("word_encoder"), {
            "ids": np.array([[i, EOT_ID] for i in label_word_ids(words)], dtype=np.int64),
            "padding": np.zeros((len(words), 2), dtype=bool)})[0]
        query = self._run(self.require_graph("cloze_encoder"), self._prompts(prompts, max_len))[0]
        return softmax(query @ targets.T * np.float32(self.manifest.temperatures["text_mlm"]))

    def answer(self, images: np.ndarray, question: str, answers: Sequence[str] | np.ndarray, *,
               max_len: int = 23) -> np.ndarray:
        """Visual question answering: the probabilities (B, A) of ``answers`` (strings, or their
        :meth:`encode_words`) to one question about each image (B, 3, S, S), as ``UniPerceiver.answer``."""
        images = self._check_visual(images)
        if images.ndim != 4:
            raise ValueError("visual question answering takes images (B, 3, S, S), not clips")
        graph = self.require_graph("vqa_encoder")
        targets = answers if isinstance(answers, np.ndarray) else self.encode_words(answers)
        prompt = question if SPE_ID in self.tokenizer.encode(question) else f"{question} <|spe|>"
        feeds = {key: np.repeat(value, len(images), axis=0) for key, value in self._prompts([prompt], max_len).items()}
        query = self._run(graph, {"images": images, **feeds})[0]
        return softmax(query @ targets.T * np.float32(self.manifest.temperatures["downstream"]))

    def caption_tokens(self, inputs: np.ndarray, *, beam_size: int = 2, max_len: int = 21, len_penalty: float = 0.0,
                       only: Sequence[int] | None = None) -> np.ndarray:
        """Beam search over the caption target set, as ``model.decoding.beam_search`` with the cache: the best
        beam's token ids (B, steps), <|endoftext|> repeated after it ends. ``only`` restricts the set to those
        token ids (and <|endoftext|>): each row's logit does not depend on the others, so the rows outside it are
        masked, which gives the tokens of a graph exported with that set."""
        if beam_size < 1 or max_len < 1:
            raise ValueError("beam_size and max_len must be at least 1")
        video = self._check_visual(inputs if inputs.ndim == 5 else inputs[:, None])
        cache = self._run("caption_prefix", {"video": video})[0]
        b = video.shape[0]
        words = np.zeros((b, 0), dtype=np.int64)
        scores = np.zeros(b, dtype=np.float32)
        ids = mask = eos_only = None
        for t in range(max_len):
            # [the last word, query t]; step 0 has no word yet, only query 0
            tokens = np.concatenate([words[:, -1:], np.full((len(words), 1), SPE_ID, dtype=np.int64)], axis=1)
            positions = np.arange(max(t - 1, 0), t + 1, dtype=np.int64)
            logits, new = self._run("caption_step", {"tokens": tokens, "positions": positions, "cache": cache})
            if ids is None:
                ids, mask, eos_only = self._caption_rows(logits.shape[1], only)
            v = len(ids)
            logp = _log_softmax((logits + mask).astype(np.float32))
            if t > 0:
                logp = np.where((words[:, -1] == EOT_ID)[:, None], eos_only, logp)
            beams = 1 if t == 0 else beam_size
            candidates = (scores[:, None] + logp).reshape(b, beams * v)
            k = min(beam_size, beams * v)
            best = np.argpartition(-candidates, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(candidates, best, axis=1), axis=1, kind="stable")
            index = np.take_along_axis(best, order, axis=1)
            scores = np.take_along_axis(candidates, index, axis=1).reshape(-1)
            beam, word = index // v, ids[index % v]
            rows = (np.arange(b)[:, None] * beams + beam).reshape(-1)
            words = np.concatenate([words[rows], word.reshape(-1, 1)], axis=1)
            cache = np.concatenate([cache, new], axis=4).take(rows, axis=2) if t > 0 else cache.take(rows, axis=2)
            if (word == EOT_ID).all():
                break
        k = words.shape[0] // b
        final = scores.reshape(b, k)
        if len_penalty > 0:
            lengths = (words != EOT_ID).sum(axis=1).reshape(b, k) + 1
            final = final / lengths.astype(np.float32) ** len_penalty
        best_beam = final.argmax(axis=1) + np.arange(b) * k
        return words[best_beam]

    def _caption_rows(self, v: int, only: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The token id of each of the caption graph's ``v`` rows, the mask of the rows outside ``only`` (-inf there,
        0 elsewhere) and the log-probabilities of a beam that has ended (0 for <|endoftext|>, -inf elsewhere)."""
        token_ids = self.manifest.caption_token_ids
        ids = np.arange(v, dtype=np.int64) if token_ids is None else np.array(token_ids, dtype=np.int64)
        eos_rows = np.flatnonzero(ids == EOT_ID)
        if ids.shape != (v,) or len(eos_rows) != 1:
            raise OnnxModelError(f"{self.folder / MANIFEST}: the caption token ids do not fit the {v} rows of the "
                                 f"caption graph")
        kept = np.ones(v, dtype=bool) if only is None else np.isin(ids, [*only, EOT_ID])
        mask = np.where(kept, 0.0, -np.inf).astype(np.float32)
        eos_only = np.full(v, -np.inf, dtype=np.float32)
        eos_only[eos_rows[0]] = 0.0
        return ids, mask, eos_only

    def caption(self, inputs: np.ndarray, *, beam_size: int = 2, max_len: int = 21,
                only: Sequence[int] | None = None) -> list[str]:
        """Captions for images (B, 3, S, S) or clips (B, T, 3, S, S); ``only`` as in :meth:`caption_tokens`."""
        tokens = self.caption_tokens(inputs, beam_size=beam_size, max_len=max_len, only=only)
        return [self.tokenizer.decode(row.tolist(), errors="ignore") for row in tokens]
