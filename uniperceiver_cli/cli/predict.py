"""``uniperceiver predict``: labels, matching texts or captions for your own image and video files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from uniperceiver_cli.cli.common import (
    Vocabulary,
    err_console,
    load_any_model,
    one_line_warnings,
    pick_device,
    user_errors,
)

if TYPE_CHECKING:
    import torch

    from uniperceiver_cli.model.uniperceiver import UniPerceiver

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".webm", ".mkv", ".mov"}


def _collect(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES))
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    if not files:
        raise ValueError("no image or video files found in " + ", ".join(map(str, paths)))
    return files


def predict(
    files: list[Path] = typer.Argument(..., help="Image and video files, or folders of them."),
    model: Path | None = typer.Option(None, "--model", help="A bundle, run, training checkpoint or .pth file."),
    preset: str | None = typer.Option(None, help="Model preset: the shape of an official file, or a fresh model."),
    labels: Path | None = typer.Option(None, help="Class names, one per line: print the top-k labels."),
    label: list[str] | None = typer.Option(None, help="A class name (repeat the option for several)."),
    templates: Path | None = typer.Option(None, help="Prompt templates for the labels, with {} for the name."),
    texts: Path | None = typer.Option(None, help="Candidate texts, one per line: print the best matches."),
    caption: bool = typer.Option(False, "--caption", help="Generate a caption for each file."),
    top_k: int = typer.Option(5, min=1),
    beam_size: int = typer.Option(2, min=1),
    max_len: int = typer.Option(21, min=1),
    vocabulary: Vocabulary = typer.Option(
        Vocabulary.trained, help="Captions: decode over the tokens the model's caption task trained on (trained; all "
        "when the bundle records none) or all 49,411 (full)."),
    num_frames: int = typer.Option(8, min=1, help="Frames sampled evenly over each video."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
    routing_task: str | None = typer.Option(None, "--routing-task", help="Task-routed MoE models: the training "
                                            "task whose experts to use."),
) -> None:
    """Zero-shot labels (--labels/--label), best-matching texts (--texts) or captions (--caption) for files.
    --model DIR/onnx runs an exported model on onnxruntime, without importing PyTorch."""
    from uniperceiver_cli.onnx.runtime import is_onnx_folder
    from uniperceiver_cli.text_files import read_lines

    with user_errors(), one_line_warnings():
        modes = [labels is not None or bool(label), texts is not None, caption]
        if sum(modes) != 1:
            raise ValueError("choose exactly one of --labels/--label, --texts or --caption")
        paths = _collect(files)
        names = (read_lines(labels, "labels") if labels else []) + list(label or [])
        candidates = read_lines(texts, "texts") if texts else []
        template_list = read_lines(templates, "templates") if templates else None
        if model is not None and is_onnx_folder(model):
            if preset is not None:
                raise ValueError("--preset does not apply to an exported ONNX folder: the graphs fix the model")
            if device not in ("auto", "cpu"):
                raise ValueError(f"--device {device}: the ONNX runtime here runs on the CPU")
            answer, read = _onnx_task(model, names, template_list, candidates, vocabulary, beam_size, max_len)
        else:
            answer, read = _torch_task(model, preset, device, names, template_list, candidates, vocabulary,
                                       beam_size, max_len, routing_task)
        results, failures = [], 0
        for path in paths:
            try:
                inputs = read(path, num_frames)
            except (ValueError, FileNotFoundError) as e:
                err_console.print(f"[red]skipped:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
                failures += 1
                continue
            results.append({"file": str(path), **answer(inputs, top_k)})
    _show(results, as_json)
    if failures:
        raise typer.Exit(1)


def _torch_task(model: Path | None, preset: str | None, device: str, names: list[str], templates: list[str] | None,
                candidates: list[str], vocabulary: Vocabulary, beam_size: int, max_len: int,
                routing_task: str | None):  # noqa: ANN202
    """The answer to give for one file's inputs, and how to read a file, with the PyTorch model (a task-routed one
    as ``routing_task``)."""
    import torch

    from uniperceiver_cli.evaluate.runners import label_features
    from uniperceiver_cli.evaluate.tasks import caption_vocabulary
    from uniperceiver_cli.model.pixels import read_video_frames
    from uniperceiver_cli.model.preprocess import image_transform, load_image, video_views

    dev = pick_device(device)
    net = load_any_model(model, preset, dev)
    transform = image_transform(net.config, task="classification" if names else "caption")
    with torch.inference_mode(), net.routing_task(routing_task):
        if names:
            rows = net.classifier_rows(names)  # before encoding: a name the classifier lacks is refused
            answer = Labels(names, label_features(net, names, templates), rows)
        elif candidates:
            answer = Texts(candidates, net.encode_text(candidates))
        else:
            answer = Captions(*net.caption_targets(caption_vocabulary(net, vocabulary)), beam_size, max_len)

    def read(path: Path, num_frames: int) -> torch.Tensor:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            frames = torch.from_numpy(read_video_frames(path, num_frames))
            return video_views(frames, net.config.image_size).to(dev)
        return transform(load_image(path))[None].to(dev)

    @torch.inference_mode()
    def respond(inputs: torch.Tensor, top_k: int) -> dict:
        with net.routing_task(routing_task):
            return answer(net, inputs, top_k)

    return respond, read


def _onnx_task(folder: Path, names: list[str], templates: list[str] | None, candidates: list[str],
               vocabulary: Vocabulary, beam_size: int, max_len: int):  # noqa: ANN202
    """As :func:`_torch_task`, on onnxruntime with numpy preprocessing (no PyTorch)."""
    import numpy as np

    from uniperceiver_cli.model.pixels import image_array, load_image, read_video_frames, video_views
    from uniperceiver_cli.onnx.runtime import OnnxModel, softmax

    net = OnnxModel(folder)
    size = net.manifest.image_size
    if not names and not candidates and vocabulary is Vocabulary.full and net.manifest.caption_token_ids is not None:
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
            return _top(features @ (feats / max(float(np.linalg.norm(feats)), 1e-12)), candidates, top_k,
                        "similarity")
    else:
        # As with the bundle: "trained" decodes over the recorded caption set (a graph exported with the whole
        # vocabulary is masked to it), "full" over every token.
        only = net.manifest.trained_caption_token_ids if vocabulary is Vocabulary.trained else None

        def answer(inputs: np.ndarray, top_k: int) -> dict:
            one = inputs[len(inputs) // 2:len(inputs) // 2 + 1]  # a video's centre view, or the image
            return {"caption": net.caption(one, beam_size=beam_size, max_len=max_len, only=only)[0]}

    def read(path: Path, num_frames: int) -> np.ndarray:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            return video_views(read_video_frames(path, num_frames), size)
        return image_array(load_image(path), size, "classification" if names else "caption")[None]

    return answer, read


@dataclass
class Labels:
    """Zero-shot labels: the class names, their features and their classifier-prompt rows."""

    names: list[str]
    features: torch.Tensor
    rows: torch.Tensor | None

    def __call__(self, net: UniPerceiver, inputs: torch.Tensor, top_k: int) -> dict:
        """A video arrives as its spatial views (V, T, 3, S, S); the softmax is averaged over them."""
        scores = net.classification_logits(inputs, self.features, self.rows).float().softmax(-1).mean(0)
        return _top(scores, self.names, top_k, "prob")


@dataclass
class Texts:
    """Best-matching texts by cosine similarity; a video's views are averaged."""

    texts: list[str]
    features: torch.Tensor

    def __call__(self, net: UniPerceiver, inputs: torch.Tensor, top_k: int) -> dict:
        import torch

        feats = net.encode_video(inputs) if inputs.dim() == 5 else net.encode_image(inputs)
        scores = torch.nn.functional.normalize(feats.float().mean(0), dim=-1) @ self.features.float().t()
        return _top(scores, self.texts, top_k, "similarity")


@dataclass
class Captions:
    """Beam-search captions over a target set (features and each row's token id, None: the whole vocabulary)."""

    vocabulary: torch.Tensor
    token_ids: torch.Tensor | None
    beam_size: int
    max_len: int

    def __call__(self, net: UniPerceiver, inputs: torch.Tensor, top_k: int) -> dict:
        from uniperceiver_cli.model.decoding import beam_search
        from uniperceiver_cli.model.tokenizer import get_tokenizer

        one = inputs[len(inputs) // 2:len(inputs) // 2 + 1]  # a video's centre view, or the image
        tokens = beam_search(net, one, beam_size=self.beam_size, max_len=self.max_len, vocabulary=self.vocabulary,
                             token_ids=self.token_ids, use_cache=net.decodes_with_cache).tokens
        return {"caption": get_tokenizer().decode_batch(tokens.cpu(), errors="ignore")[0]}


def _top(scores: Any, entries: list[str], top_k: int, key: str) -> dict:
    """The ``top_k`` best of ``entries`` by ``scores`` (a numpy array or a tensor, one score per entry)."""
    import numpy as np

    scores = np.asarray(scores.float().cpu() if hasattr(scores, "cpu") else scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")[:top_k]
    return {"top": [{"text": entries[int(i)], key: round(float(scores[i]), 6)} for i in order]}


def _show(results: list[dict], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(results, indent=2, ensure_ascii=False))
        return
    table = Table()
    table.add_column("file")
    table.add_column("prediction")
    for row in results:
        if "caption" in row:
            table.add_row(row["file"], row["caption"])
        else:
            value = next(k for k in row["top"][0] if k != "text")
            table.add_row(row["file"], "\n".join(f"{e['text']}  {e[value]:.3f}" for e in row["top"]))
    Console().print(table)
