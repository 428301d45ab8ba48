"""``uniperceiver export``: any checkpoint (a bundle, a run, either engine's training checkpoint, an official file)
into a bundle (``model.safetensors`` + ``config.json``), written atomically.

The source is located and read as :func:`~uniperceiver_cli.checkpoints.loading.load_model` does (every file with
``weights_only=True``), all of it before anything is written: the bundle goes into a temporary sibling folder that
is renamed onto ``out`` once complete (an existing ``out`` is replaced only with ``force``, and only then). What an
export stopped midway left beside ``out`` is put right first (:func:`.checkpoints.bundle.recover_export`).

``fold`` folds an MoE model's experts per attribute row (:func:`uniperceiver_cli.model.folding.fold_experts`);
``onnx`` adds ``out/onnx/``, the graphs of :mod:`uniperceiver_cli.onnx.export`, each validated against PyTorch.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from uniperceiver_cli.checkpoints.bundle import (
    BUNDLE_CONFIG,
    BUNDLE_WEIGHTS,
    DTYPES,
    recover_export,
    save_bundle,
    staging_folders,
)
from uniperceiver_cli.checkpoints.errors import CheckpointError
from uniperceiver_cli.checkpoints.loading import build_model, model_config, read_weights, source_provenance
from uniperceiver_cli.checkpoints.sources import Source, find_source
from uniperceiver_cli.model.folding import fold_experts
from uniperceiver_cli.onnx.export import GraphReport, require_onnx, write_onnx
from uniperceiver_cli.onnx.runtime import GRAPHS, MANIFEST, TOKENIZER_FILE

ONNX_DIR = "onnx"
BUNDLE_FILES = {BUNDLE_WEIGHTS, BUNDLE_CONFIG, BUNDLE_WEIGHTS + ".tmp", BUNDLE_CONFIG + ".tmp", ONNX_DIR}
ONNX_FILES = {MANIFEST, TOKENIZER_FILE, *(f"{g}.onnx" for g in GRAPHS)}


@dataclass
class Exported:
    source: Source
    out: Path
    dtype: str
    tensors: int
    parameters: tuple[int, int] | None = None  # before and after folding the experts
    graphs: list[GraphReport] = field(default_factory=list)


def _check_out(out: Path, source: Source, force: bool) -> None:
    if out.exists() and not force:
        raise CheckpointError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder")
    others = sorted(p.name for p in out.iterdir() if p.name not in BUNDLE_FILES) if out.is_dir() else []
    onnx = out / ONNX_DIR
    if onnx.is_symlink() or (onnx.exists() and (not onnx.is_dir() or {p.name for p in onnx.iterdir()} - ONNX_FILES)):
        others.append(f"{ONNX_DIR}/ (not the ONNX graphs this command writes)")
    if others:  # --force replaces a bundle, never a folder holding anything else
        raise CheckpointError(f"{out} is not a bundle (it holds {', '.join(others[:3])}); export to another folder")
    resolved = out.resolve()
    if source.kind == "bundle" and source.given is None and resolved == source.path.resolve():
        return  # re-saving a bundle in place: it is read whole before the folder is replaced
    for held in {p.resolve() for p in (source.path, source.weights, source.given) if p is not None}:
        if held == resolved or resolved in held.parents:
            raise CheckpointError(f"{out} holds the source {held}; export to another folder")


def export(src: str | Path | Source, out: str | Path, *, kind: str | None = None, step: int | None = None,
           latest: bool = False, dtype: str = "fp32", preset: str | None = None, force: bool = False,
           fold_video_type: bool | None = None, fold: bool = False, onnx: bool = False,
           caption_vocabulary: str = "trained") -> Exported:
    """Write the bundle of ``src`` into ``out``. ``kind`` forces the source's kind, ``step`` / ``latest`` pick a
    checkpoint of a run directory, ``dtype`` ("fp32", "bf16", "fp16") casts the floating-point weights,
    ``preset`` gives the model config where the source records none. ``fold`` folds an MoE model's experts;
    ``onnx`` writes the ONNX graphs too, their caption graph scoring ``caption_vocabulary`` ("trained": the
    tokens the caption task trained on, when the source records them; "full": the whole vocabulary).
    One-line :class:`CheckpointError` for bad input, with nothing written."""
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if caption_vocabulary not in ("trained", "full"):
        raise CheckpointError(f"unknown caption vocabulary {caption_vocabulary!r}; choose trained or full")
    if onnx:
        require_onnx()
    out = Path(out)
    source = src if isinstance(src, Source) else find_source(src, kind=kind, step=step, latest=latest)
    recover_export(out)
    _check_out(out, source, force)
    weights = read_weights(source, fold_video_type)
    model = build_model(source, weights, model_config(source, weights, preset))
    parameters = None
    if fold:
        before = model.num_parameters()
        model = fold_experts(model)
        parameters = (before, model.num_parameters())
    provenance = {**source_provenance(source, weights), "dtype": dtype, **({"folded_experts": True} if fold else {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = staging_folders(out)
    shutil.rmtree(tmp, ignore_errors=True)
    graphs = []
    try:
        if onnx:
            ids = model.caption_vocabulary if caption_vocabulary == "trained" else None
            graphs = write_onnx(model, tmp / ONNX_DIR, ids, provenance)
        save_bundle(model, tmp, dtype=dtype, provenance=provenance)
        if out.exists():
            if not force:  # appeared while we were writing
                raise CheckpointError(f"{out} already exists; pass --force to replace it")
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return Exported(source, out, dtype, len(model.state_dict()), parameters, graphs)
