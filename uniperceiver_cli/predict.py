"""The answers of ``predict`` for one file: zero-shot labels, best-matching texts or a caption, from a PyTorch
model or an exported ONNX folder. Only the PyTorch answerer imports torch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from uniperceiver_cli.data.shards import VIDEO_SUFFIXES

if TYPE_CHECKING:
    import torch

    from uniperceiver_cli.model.uniperceiver import UniPerceiver


def torch_answerer(net: UniPerceiver, dev: torch.device, names: list[str], templates: list[str] | None,
                   candidates: list[str], vocabulary: str, beam_size: int, max_len: int,
                   routing_task: str | None):  # noqa: ANN201
    """The answer to give for one file's inputs, and how to read a file, with the PyTorch model ``net`` on ``dev``
    (a task-routed one as ``routing_task``); ``vocabulary`` is "trained" or "full", as for ``evaluate``."""
    import torch

    from uniperceiver_cli.evaluate.runners import label_features
    from uniperceiver_cli.evaluate.tasks import caption_vocabulary
    from uniperceiver_cli.model.pixels import read_video_frames
    from uniperceiver_cli.model.preprocess import image_transform, load_image, video_views

    transform = image_transform(net.config, task="classification" if names else "caption")
    with torch.inference_mode(), net.routing_task(routing_task):
        if names:
            rows = net.classifier_rows(names)  # before encoding: a name the classifier lacks is refused
            features = label_features(net, names, templates)

            def answer(inputs: torch.Tensor, top_k: int) -> dict:
                """A video arrives as its spatial views (V, T, 3, S, S); the softmax is averaged over them."""
                scores = net.classification_logits(inputs, features, rows).float().softmax(-1).mean(0)
                return _top(scores, names, top_k, "prob")
        elif candidates:
            features = net.encode_text(candidates)

            def answer(inputs: torch.Tensor, top_k: int) -> dict:
                """Cosine similarity; a video's views are averaged."""
                feats = net.encode_video(inputs) if inputs.dim() == 5 else net.encode_image(inputs)
                scores = torch.nn.functional.normalize(feats.float().mean(0), dim=-1) @ features.float().t()
                return _top(scores, candidates, top_k, "similarity")
        else:
            targets = net.caption_targets(caption_vocabulary(net, vocabulary))

            def answer(inputs: torch.Tensor, top_k: int) -> dict:
                one = inputs[len(inputs) // 2:len(inputs) // 2 + 1]  # a video's centre view, or the image
                return {"caption": net.caption(one, beam_size=beam_size, max_len=max_len, targets=targets)[0]}

    def read(path: Path, num_frames: int) -> torch.Tensor:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            return video_views(torch.from_numpy(read_video_frames(path, num_frames)), net.config.image_size).to(dev)
        return transform(load_image(path))[None].to(dev)

    @torch.inference_mode()
    def respond(inputs: torch.Tensor, top_k: int) -> dict:
        with net.routing_task(routing_task):
            return answer(inputs, top_k)

    return respond, read


def onnx_answerer(folder: Path, names: list[str], templates: list[str] | None, candidates: list[str],
                  vocabulary: str, beam_size: int, max_len: int):  # noqa: ANN201
    """As :func:`torch_answerer`, on onnxruntime with numpy preprocessing (no PyTorch)."""
    import numpy as np

    from uniperceiver_cli.model.pixels import image_array, load_image, read_video_frames, video_views
    from uniperceiver_cli.onnx.runtime import OnnxModel, softmax

    net = OnnxModel(folder)
    size = net.manifest.image_size
    if not names and not candidates and vocabulary == "full" and net.manifest.caption_token_ids is not None:
        raise ValueError(f"{folder}'s caption graph scores the {len(net.manifest.caption_token_ids)} tokens it was "
                         f"exported with; export again with --vocabulary full to decode over all of them")
    if names:
        rows = net.classifier_rows(names)
        features = net.label_features(names, templates)

        def answer(inputs: np.ndarray, top_k: int) -> dict:
            probs = softmax(net.classification_logits(inputs, features, rows)).mean(0)
            return _top(probs, names, top_k, "prob")
    elif candidates:
        features = net.encode_text(candidates)

        def answer(inputs: np.ndarray, top_k: int) -> dict:
            feats = net.encode_visual(inputs).mean(0)
            return _top(features @ (feats / max(float(np.linalg.norm(feats)), 1e-12)), candidates, top_k, "similarity")
    else:
        # As with the bundle: "trained" decodes over the recorded caption set (a graph exported with the whole
        # vocabulary is masked to it), "full" over every token.
        only = net.manifest.trained_caption_token_ids if vocabulary == "trained" else None

        def answer(inputs: np.ndarray, top_k: int) -> dict:
            one = inputs[len(inputs) // 2:len(inputs) // 2 + 1]  # a video's centre view, or the image
            return {"caption": net.caption(one, beam_size=beam_size, max_len=max_len, only=only)[0]}

    def read(path: Path, num_frames: int) -> np.ndarray:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            return video_views(read_video_frames(path, num_frames), size)
        return image_array(load_image(path), size, "classification" if names else "caption")[None]

    return answer, read


def _top(scores: Any, entries: list[str], top_k: int, key: str) -> dict:
    """The ``top_k`` best of ``entries`` by ``scores`` (a numpy array or a tensor, one score per entry)."""
    import numpy as np

    scores = np.asarray(scores.float().cpu() if hasattr(scores, "cpu") else scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")[:top_k]
    return {"top": [{"text": entries[int(i)], key: round(float(scores[i]), 6)} for i in order]}
