"""The answers of ``predict`` for a batch of files: zero-shot labels, best-matching texts or a caption, from a PyTorch
model or an exported ONNX folder. Only the PyTorch answerer imports torch.

A file is read into its own array: an image as ``(1, 3, S, S)``, a video as its spatial views ``(V, T, 3, S, S)``.
A batch stacks the files of one shape into one forward pass (its images, its videos), and each file's answer is read
from its rows: a video's softmax (or feature) is averaged over its views, its caption is that of its centre view.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uniperceiver_cli.data.shards import VIDEO_SUFFIXES

if TYPE_CHECKING:
    import torch

    from uniperceiver_cli.model.uniperceiver import UniPerceiver

# answer(files' arrays, top_k) -> one answer per file; read(path, num_frames) -> the file's array
Answer = Callable[[Sequence[Any], int], list[dict]]
Read = Callable[[Path, int], Any]


def torch_answerer(net: UniPerceiver, dev: torch.device, names: list[str], templates: list[str] | None,
                   candidates: list[str], vocabulary: str, beam_size: int, max_len: int,
                   routing_task: str | None, question: str | None = None) -> tuple[Answer, Read]:
    """How to answer a batch of files and how to read one, with the PyTorch model ``net`` on ``dev`` (a task-routed
    one as ``routing_task``); ``vocabulary`` is "trained" or "full", as for ``evaluate``. With a ``question``,
    ``names`` are the candidate answers of visual question answering (images only)."""
    import torch

    from uniperceiver_cli.evaluate.runners import label_features
    from uniperceiver_cli.evaluate.tasks import caption_vocabulary
    from uniperceiver_cli.model.pixels import read_video_frames
    from uniperceiver_cli.model.preprocess import image_transform, load_image, video_views

    kind = "vqa" if question is not None else "classification" if names else "caption"
    transform = image_transform(net.config, task=kind)
    with torch.inference_mode(), net.routing_task(routing_task):
        if question is not None:
            answers = net.answer_features(names)

            def run(inputs: torch.Tensor, views: int, top_k: int) -> list[dict]:
                probs = net.answer(inputs, question, answers).float().cpu().numpy()
                return [_top(p, names, top_k, "prob") for p in probs]
        elif names:
            rows = net.classifier_rows(names)  # before encoding: a name the classifier lacks is refused
            features = label_features(net, names, templates)

            def run(inputs: torch.Tensor, views: int, top_k: int) -> list[dict]:
                probs = net.classification_logits(inputs, features, rows).float().softmax(-1)
                return [_top(p, names, top_k, "prob") for p in probs.view(-1, views, len(names)).mean(1).cpu().numpy()]
        elif candidates:
            features = net.encode_text(candidates).float()

            def run(inputs: torch.Tensor, views: int, top_k: int) -> list[dict]:
                feats = net.encode_video(inputs) if inputs.dim() == 5 else net.encode_image(inputs)
                feats = torch.nn.functional.normalize(feats.float().view(-1, views, feats.shape[-1]).mean(1), dim=-1)
                return [_top(s, candidates, top_k, "similarity") for s in (feats @ features.t()).cpu().numpy()]
        else:
            targets = net.caption_targets(caption_vocabulary(net, vocabulary))

            def run(inputs: torch.Tensor, views: int, top_k: int) -> list[dict]:
                centre = inputs.view(-1, views, *inputs.shape[1:])[:, views // 2]  # a video's centre view
                return [{"caption": c} for c in net.caption(centre, beam_size=beam_size, max_len=max_len,
                                                            targets=targets)]

    def read(path: Path, num_frames: int) -> torch.Tensor:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            if question is not None:
                raise ValueError(f"{path}: visual question answering takes images, not videos")
            return video_views(torch.from_numpy(read_video_frames(path, num_frames)), net.config.image_size).to(dev)
        return transform(load_image(path))[None].to(dev)

    @torch.inference_mode()
    def answer(items: Sequence[torch.Tensor], top_k: int) -> list[dict]:
        with net.routing_task(routing_task):
            return _by_shape(items, torch.cat, lambda inputs, views: run(inputs, views, top_k))

    return answer, read


def sentence_answerer(model: UniPerceiver | Path, words: list[str], max_len: int, routing_task: str | None
                      ) -> Callable[[Sequence[str], int], list[dict]]:
    """How to answer a batch of cloze prompts (text classification): the top label ``words`` at each prompt's
    <|spe|> slot, with a PyTorch model or an exported ONNX folder (``model`` a path). A prompt without a slot is
    answered with an error."""
    from uniperceiver_cli.model.config import SPE_ID
    from uniperceiver_cli.model.tokenizer import get_tokenizer, label_word_ids

    label_word_ids(words)  # a word of several tokens is refused before any prompt is read
    if isinstance(model, Path):
        from uniperceiver_cli.onnx.runtime import OnnxModel

        runtime = OnnxModel(model)
        tokenizer = runtime.tokenizer

        def probabilities(prompts: list[str]) -> Any:
            return runtime.classify_text(prompts, words, max_len=max_len)
    else:
        tokenizer = get_tokenizer()

        def probabilities(prompts: list[str]) -> Any:
            with model.routing_task(routing_task):
                return model.classify_text(prompts, words, max_len=max_len).float().cpu().numpy()

    def answer(prompts: Sequence[str], top_k: int) -> list[dict]:
        rows: list[dict] = [{"sentence": prompt} for prompt in prompts]
        good = [i for i, prompt in enumerate(prompts) if SPE_ID in tokenizer.encode(prompt)]
        for i in set(range(len(prompts))) - set(good):
            rows[i]["error"] = "the sentence holds no <|spe|> slot, where its label word goes"
        if good:
            for i, p in zip(good, probabilities([prompts[i] for i in good]), strict=True):
                rows[i].update(_top(p, words, top_k, "prob"))
        return rows

    return answer


def onnx_answerer(folder: Path, names: list[str], templates: list[str] | None, candidates: list[str],
                  vocabulary: str, beam_size: int, max_len: int, question: str | None = None) -> tuple[Answer, Read]:
    """As :func:`torch_answerer`, on onnxruntime with numpy preprocessing (no PyTorch)."""
    import numpy as np

    from uniperceiver_cli.model.pixels import image_array, load_image, read_video_frames, video_views
    from uniperceiver_cli.onnx.runtime import OnnxModel, softmax

    net = OnnxModel(folder)
    size = net.manifest.image_size
    if not names and not candidates and vocabulary == "full" and net.manifest.caption_token_ids is not None:
        raise ValueError(f"{folder}'s caption graph scores the {len(net.manifest.caption_token_ids)} tokens it was "
                         f"exported with; export again with --vocabulary full to decode over all of them")
    kind = "vqa" if question is not None else "classification" if names else "caption"
    if question is not None:
        net.require_graph("vqa_encoder")  # before any file is read: a folder without it says why in one line
        answers = net.encode_words(names)

        def run(inputs: np.ndarray, views: int, top_k: int) -> list[dict]:
            return [_top(p, names, top_k, "prob") for p in net.answer(inputs, question, answers)]
    elif names:
        rows = net.classifier_rows(names)
        features = net.label_features(names, templates)

        def run(inputs: np.ndarray, views: int, top_k: int) -> list[dict]:
            probs = softmax(net.classification_logits(inputs, features, rows))
            return [_top(p, names, top_k, "prob") for p in probs.reshape(-1, views, len(names)).mean(1)]
    elif candidates:
        features = net.encode_text(candidates)

        def run(inputs: np.ndarray, views: int, top_k: int) -> list[dict]:
            feats = net.encode_visual(inputs)
            feats = feats.reshape(-1, views, feats.shape[-1]).mean(1)
            feats = feats / np.maximum(np.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
            return [_top(s, candidates, top_k, "similarity") for s in feats @ features.T]
    else:
        # As with the bundle: "trained" decodes over the recorded caption set (a graph exported with the whole
        # vocabulary is masked to it), "full" over every token.
        only = net.manifest.trained_caption_token_ids if vocabulary == "trained" else None

        def run(inputs: np.ndarray, views: int, top_k: int) -> list[dict]:
            centre = inputs.reshape(-1, views, *inputs.shape[1:])[:, views // 2]  # a video's centre view
            return [{"caption": c} for c in net.caption(centre, beam_size=beam_size, max_len=max_len, only=only)]

    def read(path: Path, num_frames: int) -> np.ndarray:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            if question is not None:
                raise ValueError(f"{path}: visual question answering takes images, not videos")
            return video_views(read_video_frames(path, num_frames), size)
        return image_array(load_image(path), size, kind)[None]

    def answer(items: Sequence[np.ndarray], top_k: int) -> list[dict]:
        return _by_shape(items, np.concatenate, lambda inputs, views: run(inputs, views, top_k))

    return answer, read


def _by_shape(items: Sequence[Any], cat: Callable[[list[Any]], Any], run: Callable[[Any, int], list[dict]]
              ) -> list[dict]:
    """``run`` once per shape among ``items`` (the images, the videos of one frame count), on their rows stacked;
    the answers in the items' order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(tuple(item.shape), []).append(i)
    answers: list[dict] = [{}] * len(items)
    for shape, members in groups.items():
        for i, found in zip(members, run(cat([items[i] for i in members]), shape[0]), strict=True):
            answers[i] = found
    return answers


def _top(scores: Any, entries: list[str], top_k: int, key: str) -> dict:
    """The ``top_k`` best of ``entries`` by ``scores`` (a numpy array, one score per entry)."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")[:top_k]
    return {"top": [{"text": entries[int(i)], key: round(float(scores[i]), 6)} for i in order]}
