"""Model FLOPs of a training step, by task, from the shapes of its batch; and MFU against the device's peak.

Counted: every matmul, convolution and attention product, 2 FLOPs per multiply-add, as
``torch.utils.flop_counter.FlopCounterMode`` counts them (norms, softmax, GELU and other elementwise work are
not). A training step is 3 forward passes: the backward runs two matmuls for each of the forward's (the MFU
convention, also for prompt tuning, whose frozen weights need no gradient of their own), except the patch
convolution, whose input (the pixels) needs no gradient: 2 passes. Token and context routing's expert buffers
hold ``capacity`` slots per expert; dropless, they are counted at the balanced depth ``top_k * T / E``, a lower
bound (the real depth is the busiest expert's, known only on the device).
``tests/train/test_flops.py`` holds the formula to FlopCounterMode within 5% for every task family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from uniperceiver_cli.model.config import ModelConfig

TRAIN_PASSES = 3  # forward + backward (two matmuls per forward matmul)
PATCH_PASSES = 2  # the patch convolution's backward: its weight's gradient only
# Dense peak FLOP/s by device name (torch.cuda.get_device_name), per precision: "bf16" (and fp16), "tf32" (fp32
# matmuls in TensorFloat-32) and "fp32". From the vendors' data sheets, without sparsity; the first match wins.
PEAK_FLOPS = {
    "H100 PCIe": {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12},
    "H100": {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12},  # SXM
    "H200": {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
}


@dataclass(frozen=True)
class Call:
    """One encoder call: ``sequences`` of ``tokens`` tokens, ``rows`` routing rows (segments)."""

    sequences: int
    tokens: int
    rows: int = 1


def encoder_flops(config: ModelConfig, call: Call) -> int:
    """Forward FLOPs of ``call`` through every block (deep prompts included)."""
    d, m = config.width, config.mlp_dim
    prompts = config.prompt.deep_prompt_length
    tokens = call.sequences * call.tokens
    linears = ((d, 3 * d), (d, d), (d, m), (m, d))  # qkv, out, fc1, fc2
    total = 0
    for index in range(config.layers):
        moe = config.moe if config.moe is not None and config.moe.is_moe_layer(index) else None
        total += 4 * tokens * (call.tokens + prompts) * d  # q k^T and attention x v
        total += 2 * prompts * 3 * d * d  # the prompts' keys and values
        if moe is None:
            total += sum(2 * tokens * i * o for i, o in linears)
        elif moe.data_dependent:  # router, then each expert on its slots
            slots = _slots(tokens, config)
            total += 2 * 2 * tokens * d * moe.num_experts  # two gates: attention, MLP
            total += sum(2 * moe.num_experts * slots * i * o for i, o in linears)
        else:  # each row's experts merged (weights and biases), then one linear per token
            total += sum(2 * call.rows * moe.num_experts * (i * o + o) + 2 * tokens * i * o for i, o in linears)
    return total


def _slots(tokens: int, config: ModelConfig) -> int:
    """Slots per expert of a token-routed call: its capacity; dropless, the balanced depth."""
    moe = config.moe
    factor = 1.0 if moe.capacity_factor is None else moe.capacity_factor
    return min(tokens, math.ceil(factor * moe.top_k * tokens / moe.num_experts))


def visual_tokens(config: ModelConfig, frames: int) -> int:
    """<|spe|> and the patches of ``frames`` frames."""
    return 1 + frames * config.grid_size**2


def patch_flops(config: ModelConfig, images: int) -> int:
    """The patch embedding's convolution over ``images`` frames."""
    return 2 * images * config.grid_size**2 * config.width * 3 * config.patch_size**2


def head_flops(config: ModelConfig, queries: int, targets: int, features: int) -> int:
    """``features`` projections (queries and targets encoded in this step) and the (queries x targets) logits."""
    d = config.width
    return 2 * features * d * d + 2 * queries * targets * d


@dataclass(frozen=True)
class StepShape:
    """What a task's micro-step encodes: ``batch`` samples of ``frames`` frames (0: text only) and ``text`` tokens,
    ``targets`` target rows of ``target_tokens`` tokens encoded here (class names, vocabulary rows; 0 for
    retrieval's in-batch captions), ``scored`` queries scored against them (MLM's masked tokens)."""

    family: str
    batch: int
    frames: int = 0
    text: int = 0
    targets: int = 0
    target_tokens: int = 0
    target_rows: int = 0  # the set's whole size, the logits' width (targets, when not split across processes)
    scored: int = 0


def step_flops(config: ModelConfig, shape: StepShape) -> int:
    """Model FLOPs of one training micro-step: the forward x :data:`TRAIN_PASSES`, the patches x
    :data:`PATCH_PASSES`."""
    b, family = shape.batch, shape.family
    width = shape.target_rows or shape.targets
    patches = PATCH_PASSES * patch_flops(config, b * shape.frames)
    targets = encoder_flops(config, Call(shape.targets, 1 + shape.target_tokens)) if shape.targets else 0
    if family in ("classification", "retrieval"):
        forward = encoder_flops(config, Call(b, visual_tokens(config, shape.frames)))
        if family == "classification":
            forward += targets + head_flops(config, b, width, b + shape.targets)
            if config.prompt.classifier_classes:
                forward += 2 * b * config.width * config.prompt.classifier_classes
        else:
            forward += encoder_flops(config, Call(b, 1 + shape.text)) + head_flops(config, b, b, 2 * b)
    elif family == "vqa":  # [<|spe|>, image, question] in one call of two rows; the slot against the answers
        forward = (encoder_flops(config, Call(b, visual_tokens(config, shape.frames) + shape.text, rows=2)) + targets
                   + head_flops(config, b, width, b + shape.targets))
    elif family == "caption":
        prefix = visual_tokens(config, shape.frames)
        forward = (targets + encoder_flops(config, Call(b, prefix + 2 * shape.text, rows=2))
                   + head_flops(config, b * shape.text, width, b * shape.text + shape.targets))
    else:  # mlm (no frames, no patches)
        forward = (encoder_flops(config, Call(b, 1 + shape.text)) + targets
                   + head_flops(config, shape.scored, width, shape.scored + shape.targets))
    return TRAIN_PASSES * forward + patches


def peak_flops(device_name: str, precision: str, tf32: bool) -> float | None:
    """The device's dense peak FLOP/s for a run's precision; None for a device not in :data:`PEAK_FLOPS`."""
    kind = "bf16" if precision in ("bf16", "fp16") else "tf32" if tf32 else "fp32"
    for name, peaks in PEAK_FLOPS.items():
        if name in device_name:
            return peaks[kind]
    return None
