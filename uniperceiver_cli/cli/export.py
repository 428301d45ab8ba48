"""``uniperceiver export``: a bundle from any checkpoint (bundle, run directory, training checkpoint, official file)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from uniperceiver_cli.cli.common import Vocabulary, one_line_warnings, user_errors


class SourceKind(str, Enum):
    official = "official"
    deepspeed = "deepspeed"
    run = "run"
    bundle = "bundle"
    state = "state"


class Dtype(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


def export(
    src: Path = typer.Argument(..., help="A bundle, a run directory, a training checkpoint (checkpoints/step-N, "
                               "state.pt, a DeepSpeed folder), an official .pth file, a released model by name "
                               "(uniperceiver models) or hf-hub:ORG/NAME."),
    out: Path = typer.Option(..., "--out", help="The bundle folder to write (model.safetensors + config.json)."),
    source_kind: SourceKind | None = typer.Option(None, "--from", help="Take SRC as this kind instead of "
                                                  "detecting it."),
    step: int | None = typer.Option(None, "--step", min=0, help="A run directory: export checkpoints/step-N."),
    latest: bool = typer.Option(False, "--latest", help="A run directory: export its last checkpoint."),
    dtype: Dtype = typer.Option(Dtype.fp32, "--dtype", help="The weights' dtype in the bundle."),
    preset: str | None = typer.Option(None, help="The model config, for a checkpoint that records none."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUT (once the new bundle is complete)."),
    fold_experts: bool = typer.Option(False, "--fold-experts", help="MoE models: fold the experts into one dense "
                                      "linear per attribute row (inference only; outputs unchanged)."),
    onnx: bool = typer.Option(False, "--onnx", help="Also write OUT/onnx/: image, video and text encoders and the "
                              "caption prefix and decoding step, each checked against PyTorch in onnxruntime."),
    vocabulary: Vocabulary = typer.Option(
        Vocabulary.trained, help="--onnx: the caption graph scores the tokens the model's caption task trained on "
        "(trained; all when the source records none) or all 49,411 (full)."),
) -> None:
    """Write a bundle (model.safetensors + config.json) from any checkpoint this toolkit reads, optionally with
    its experts folded and its ONNX graphs."""
    with user_errors(), one_line_warnings():
        if step is not None and latest:
            raise ValueError("give --step N or --latest, not both")
        if vocabulary is not Vocabulary.trained and not onnx:
            raise ValueError("--vocabulary chooses the ONNX caption graph's target set: it needs --onnx")
        from uniperceiver_cli.checkpoints.sources import find_source
        from uniperceiver_cli.export import export as run_export

        source = find_source(src, kind=source_kind.value if source_kind else None, step=step, latest=latest)
        typer.echo(f"source: {source.describe()}")
        done = run_export(source, out, dtype=dtype.value, preset=preset, force=force, fold=fold_experts, onnx=onnx,
                          caption_vocabulary=vocabulary.value)
        if done.parameters:
            before, after = done.parameters
            typer.echo(f"folded the experts: {before:,} parameters -> {after:,}")
        for graph in done.graphs:
            typer.echo(f"onnx/{graph.name}.onnx: {graph.megabytes:.1f} MB, max abs error against PyTorch "
                       f"{graph.max_abs_error:.2e}")
        typer.echo(f"wrote {done.out} ({done.tensors} tensors, {done.dtype})")
