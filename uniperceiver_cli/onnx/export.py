"""ONNX graphs of a model (``uniperceiver export --onnx``), each checked against PyTorch with onnxruntime.

The graphs are the ones :mod:`uniperceiver_cli.onnx.runtime` runs (its docstring lists them). Each is traced with
``torch.onnx.export(dynamo=True)`` from a small wrapper around the model's own methods, with the batch, frame,
text-length and cache axes dynamic. An MoE model's graphs are traced from its dense view for the graph's one
attribute row (:func:`uniperceiver_cli.model.folding.dense_view`), so a graph carries a dense model's weights.
The caption target set (the whole vocabulary, or the tokens the caption task trained on) is encoded once here and
baked into the decoding step as a constant.

Every graph then runs in onnxruntime on inputs generated here, at other sizes than it was traced at, against
the PyTorch model; a maximum absolute error above :data:`TOLERANCE` fails the export with that number.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from uniperceiver_cli.checkpoints.errors import CheckpointError
from uniperceiver_cli.model.config import EOT_ID, SPE_ID
from uniperceiver_cli.model.decoding import CAPTION_TEXT, CAPTION_VISUAL
from uniperceiver_cli.model.folding import dense_view
from uniperceiver_cli.model.heads import TEMPERATURES
from uniperceiver_cli.model.moe import Routing
from uniperceiver_cli.model.tokenizer import bpe_path
from uniperceiver_cli.model.uniperceiver import TEXT_TARGET, VISUAL, VOCABULARY, UniPerceiver
from uniperceiver_cli.onnx.runtime import FORMAT, FORMAT_VERSION, MANIFEST, TOKENIZER_FILE

TOLERANCE = 1e-4  # fp32: onnxruntime against PyTorch, max abs error of any output
OPSET = 18


@dataclass
class GraphReport:
    name: str
    max_abs_error: float
    megabytes: float


def _cache(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    return torch.stack([torch.stack(pair) for pair in kv])  # (layers, 2, B, heads, P, head_dim)


class _Prefixed(nn.Module):
    """Holds the embedded <|spe|> prefix as a constant, so that a visual graph does not carry the word table."""

    def __init__(self, model: UniPerceiver) -> None:
        super().__init__()
        self.model = model
        with torch.inference_mode():
            self.register_buffer("spe", model.spe(1).clone())

    def prefix(self, video: torch.Tensor) -> torch.Tensor:
        """As ``UniPerceiver.visual_prefix``."""
        return torch.cat([self.spe.expand(video.shape[0], 1, -1), self.model.embed_visual(video)], dim=1)


class _Visual(_Prefixed):
    """images (B, 3, S, S) or clips (B, T, 3, S, S) -> features [, classifier prompt logits]."""

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        video = inputs if inputs.dim() == 5 else inputs[:, None]
        features = self.model.features(self.model.encode(self.prefix(video), routing=VISUAL)[0])
        prompt = self.model.head.fc_prompt
        return (features,) if prompt is None else (features, prompt(features))


class _Text(nn.Module):
    """ids (B, L) and padding (B, L) -> target features (B, D), as ``encode_text`` on ids."""

    def __init__(self, model: UniPerceiver) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return self.model.features(self.model.encode_text_tokens(ids, padding, routing=TEXT_TARGET))


class _Words(_Text):
    """ids (B, L) and padding (B, L) -> features (B, D) as word targets (label words, VQA answers), as
    ``answer_features`` on ids."""

    def forward(self, ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return self.model.features(self.model.encode_text_tokens(ids, padding, routing=VOCABULARY))


class _Cloze(_Text):
    """Prompts ids (B, L), padding (B, L) and the <|spe|> slot of each (B,) -> the slot's query feature (B, D), as
    ``cloze_logits`` reads it before scoring."""

    def forward(self, ids: torch.Tensor, padding: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        out = self.model.encode_text_tokens(ids, padding, routing=Routing(("text_input",)), side="input")[:, 1:]
        return self.model.head.project(out[torch.arange(ids.shape[0]), slots])


class _Vqa(_Prefixed):
    """images (B, 3, S, S), question ids (B, L), padding (B, L) and slots (B,) -> the slot's query feature (B, D), as
    ``vqa_logits`` reads it before scoring."""

    def forward(self, images: torch.Tensor, ids: torch.Tensor, padding: torch.Tensor,
                slots: torch.Tensor) -> torch.Tensor:
        model, prefix = self.model, self.prefix(images[:, None])
        p = prefix.shape[1]
        padding = torch.cat([torch.zeros(ids.shape[0], p, dtype=torch.bool), padding], dim=1)
        out, _ = model.encode(torch.cat([prefix, model.embed_text(ids)], dim=1), padding=padding,
                              routing=Routing(("caption_visual", "vqa_question"), (p,)))
        return model.head.project(out[torch.arange(ids.shape[0]), p + slots])


class _CaptionPrefix(_Prefixed):
    """clips (B, T, 3, S, S) -> every layer's keys/values of [<|spe|>, visual tokens], deep prompts included."""

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return _cache(self.model.encode(self.prefix(video), routing=CAPTION_VISUAL)[1])


class _CaptionStep(nn.Module):
    """New tokens (N, K) at ``positions`` (K,) after the cache: the last one's logits over the target set (the
    caption temperature applied) and the keys/values of the first K - 1, which the caller appends to the cache.
    The new tokens attend causally, which is the two-stream layout's rule for [word t-1, query t] (the query
    also sees the word, the word not the query), so K = 1 starts decoding with query 0 and K = 2 is every later
    step."""

    def __init__(self, model: UniPerceiver, targets: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("targets", targets)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, past = tokens.shape[1], cache.shape[4]
        structure = torch.cat([torch.ones(k, past, dtype=torch.bool, device=tokens.device),
                               torch.ones(k, k, dtype=torch.bool, device=tokens.device).tril()], dim=1)
        out, kv = self.model.encode(self.model.embed_text(tokens, positions), structure=structure,
                                    routing=CAPTION_TEXT, past=[(c[0], c[1]) for c in cache.unbind(0)])
        logits = self.model.head.logits(self.model.head.project(out[:, -1]), self.targets, "caption")
        return logits, _cache([(key[:, :, past:past + k - 1], value[:, :, past:past + k - 1]) for key, value in kv])


@dataclass
class _Graph:
    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    trace: tuple[torch.Tensor, ...]  # the example inputs it is traced at
    dynamic: dict[str, dict[int, object]]
    checks: list[tuple[torch.Tensor, ...]]  # the inputs it is validated at (other sizes)


def _views(model: UniPerceiver) -> dict[str, UniPerceiver]:
    """The model each graph is traced from, by attribute row: the model itself, or an MoE model's dense view."""
    rows = ("visual_input", "text_target", "caption_visual", "caption_text", "vocabulary", "text_input")
    if model.config.moe is None:
        return dict.fromkeys(rows, model)
    return {row: dense_view(model, row) for row in rows}


def _graphs(model: UniPerceiver, targets: torch.Tensor) -> dict[str, _Graph]:
    config, gen, views = model.config, torch.Generator().manual_seed(0), _views(model)
    s, frames, text_len = config.image_size, config.max_frames, config.max_text_len
    dim = torch.export.Dim
    batch, rows, past, new = dim("batch", min=1), dim("rows", min=1), dim("past", min=1), dim("new", min=1, max=2)
    # An axis that can only have one size is static (the exporter refuses a dynamic one fixed to one value).
    clip = {1: dim("frames", min=1, max=frames)} if frames > 1 else {}
    length = {1: dim("length", min=1, max=text_len)} if text_len > 1 else {}
    trace_frames, trace_len, check_len = min(2, frames), min(3, text_len), min(7, text_len)

    def pixels(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    def text(b: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, EOT_ID, (b, n), generator=gen)
        lengths = torch.randint(1, n + 1, (b,), generator=gen)
        lengths[0] = n
        ids[torch.arange(b), lengths - 1] = EOT_ID
        return ids, torch.arange(n)[None] >= lengths[:, None]

    visual = _Visual(views["visual_input"])
    visual_out = ("features",) if model.head.fc_prompt is None else ("features", "classifier")
    prefix = _CaptionPrefix(views["caption_visual"])
    with torch.inference_mode():
        cache = prefix(pixels(3, 1, 3, s, s)).clone()
    words = torch.cat([torch.randint(0, EOT_ID, (3, 1), generator=gen), torch.full((3, 1), SPE_ID)], dim=1)

    def prompts(b: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, padding = text(b, n)
        lengths = (~padding).sum(1)
        slots = torch.randint(0, n, (b,), generator=gen) % lengths
        ids[torch.arange(b), slots] = SPE_ID
        return ids, padding, slots

    prompt_dims = {"ids": {0: batch, **length}, "padding": {0: batch, **length}, "slots": {0: batch}}
    graphs = {
        "image_encoder": _Graph(visual, ("images",), visual_out, (pixels(2, 3, s, s),), {"images": {0: batch}},
                                [(pixels(3, 3, s, s),)]),
        "video_encoder": _Graph(visual, ("video",), visual_out, (pixels(2, trace_frames, 3, s, s),),
                                {"video": {0: batch, **clip}}, [(pixels(3, frames, 3, s, s),)]),
        "text_encoder": _Graph(_Text(views["text_target"]), ("ids", "padding"), ("features",),
                               text(2, trace_len), {"ids": {0: batch, **length}, "padding": {0: batch, **length}},
                               [text(4, check_len)]),
        "caption_prefix": _Graph(prefix, ("video",), ("cache",), (pixels(2, trace_frames, 3, s, s),),
                                 {"video": {0: batch, **clip}}, [(pixels(3, 1, 3, s, s),)]),
        "caption_step": _Graph(_CaptionStep(views["caption_text"], targets), ("tokens", "positions", "cache"),
                               ("logits", "new_cache"), (words[:2], torch.tensor([4, 5]), cache[:, :, :2, :, :-1]),
                               {"tokens": {0: rows, 1: new}, "positions": {0: new}, "cache": {2: rows, 4: past}},
                               [(words[:, 1:], torch.tensor([0]), cache), (words, torch.tensor([4, 5]), cache)]),
        "word_encoder": _Graph(_Words(views["vocabulary"]), ("ids", "padding"), ("features",), text(2, trace_len),
                               {"ids": {0: batch, **length}, "padding": {0: batch, **length}}, [text(4, check_len)]),
        "cloze_encoder": _Graph(_Cloze(views["text_input"]), ("ids", "padding", "slots"), ("query",),
                                prompts(2, trace_len), prompt_dims, [prompts(4, check_len)]),
    }
    if model.config.moe is None:  # one call routed by two attribute rows: no dense view of one row serves it
        graphs["vqa_encoder"] = _Graph(_Vqa(model), ("images", "ids", "padding", "slots"), ("query",),
                                       (pixels(2, 3, s, s), *prompts(2, trace_len)),
                                       {"images": {0: batch}, **prompt_dims},
                                       [(pixels(4, 3, s, s), *prompts(4, check_len))])
    return graphs


_OP = re.compile(r"(aten::[\w.]+|aten\.[\w.]+|<OpOverload\(op='([\w.:]+)'|[\w]+::[\w.]+)")


def _export_failure(name: str, error: Exception) -> CheckpointError:
    """One line for an exporter failure, naming the operator when the exporter does."""
    # After "## Exception summary" (the exporter's own report), the cause is the summary's first line.
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error).split("## Exception summary", 1)[-1])
    if match := _OP.search(text):
        cause = f"the exporter cannot convert the operator {match.group(2) or match.group(1)}"
    else:
        cause = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)[:300]
    return CheckpointError(f"ONNX export of the {name} graph failed: {cause}")


def _export_graph(name: str, graph: _Graph, path: Path) -> None:
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.inference_mode(False):
            warnings.simplefilter("ignore")
            dynamic = tuple(graph.dynamic.get(n, {}) for n in graph.inputs)
            program = torch.onnx.export(graph.module.eval(), graph.trace, dynamo=True, input_names=list(graph.inputs),
                                        output_names=list(graph.outputs), dynamic_shapes=dynamic,
                                        opset_version=OPSET, external_data=False, verbose=False)
            program.save(str(path), external_data=False)
    except Exception as e:  # noqa: BLE001 - the exporter raises many error types; each becomes one line
        raise _export_failure(name, e) from None


def _validate(name: str, graph: _Graph, path: Path) -> float:
    """The largest absolute difference of any output between onnxruntime and PyTorch, over ``graph.checks``."""
    import onnxruntime as ort

    error = 0.0
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        runs = [session.run(None, {n: t.numpy() for n, t in zip(graph.inputs, check, strict=True)})
                for check in graph.checks]
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own error types
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CheckpointError(f"ONNX {name}: onnxruntime cannot run the exported graph: {first[:300]}") from None
    for check, got in zip(graph.checks, runs, strict=True):
        with torch.inference_mode():
            want = graph.module(*check)
        want = want if isinstance(want, tuple) else (want,)
        for output, a, b in zip(graph.outputs, got, want, strict=True):
            if a.shape != tuple(b.shape):
                raise CheckpointError(f"ONNX {name}: output {output} has shape {a.shape} in onnxruntime, "
                                      f"{tuple(b.shape)} in PyTorch")
            if a.size:
                error = max(error, float(np.abs(a.astype(np.float64) - b.double().numpy()).max()))
    if not error <= TOLERANCE:
        raise CheckpointError(f"ONNX {name}: max abs error {error:.3g} against PyTorch exceeds {TOLERANCE:g}")
    return error


def require_onnx() -> None:
    """A one-line error when the ONNX packages are missing."""
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise CheckpointError(f"--onnx needs {', '.join(missing)}: pip install 'uniperceiver[onnx]'")


def write_onnx(model: UniPerceiver, folder: Path, caption_token_ids: torch.Tensor | None,
               provenance: dict | None = None) -> list[GraphReport]:
    """Write the graphs (:data:`~uniperceiver_cli.onnx.runtime.GRAPHS` and
    :data:`~uniperceiver_cli.onnx.runtime.TASK_GRAPHS`, the VQA graph for a dense model only), the tokenizer and the
    manifest into ``folder`` (created), each graph validated.

    ``caption_token_ids`` restricts the caption target set to those tokens (plus <|endoftext|>); None: the whole
    vocabulary. The model is used in fp32 and eval mode.
    """
    require_onnx()
    routing = model.config.moe.routing if model.config.moe is not None else None
    if routing not in (None, "attribute", "modality"):
        raise CheckpointError(f"--onnx exports dense, attribute- and modality-routed models; this one routes by "
                              f"{routing}, which a graph per attribute row cannot hold")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float()
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        targets, ids = model.caption_targets(caption_token_ids)
        targets = targets.clone()
        scales = {name: float(model.head.scale(name)) for name in TEMPERATURES}
    reports = []
    for name, graph in _graphs(model, targets).items():
        path = folder / f"{name}.onnx"
        _export_graph(name, graph, path)
        reports.append(GraphReport(name, _validate(name, graph, path), path.stat().st_size / 2**20))
    shutil.copyfile(bpe_path(), folder / TOKENIZER_FILE)
    prompt = model.head.fc_prompt
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "image_size": model.config.image_size, "max_frames": model.config.max_frames,
        "max_text_len": model.config.max_text_len, "temperatures": scales,
        "caption_token_ids": None if ids is None else ids.tolist(),
        "trained_caption_token_ids": None if model.caption_vocabulary is None else model.caption_vocabulary.tolist(),
        "class_names": model.class_names,
        "classifier": None if prompt is None else {
            "classes": prompt.out_features, "similarity_weight": float(model.head.similarity_weight)},
        "validation": {r.name: r.max_abs_error for r in reports}, "tolerance": TOLERANCE,
        "provenance": provenance or {},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return reports
