"""Folding the experts of a data-independently routed mixture-of-experts model into dense weights.

With attribute, modality or task routing, a gate's decision in evaluation depends only on the segment's attribute
row, its modality or the call's task, never on the data, so each expert linear is, per such key, one dense linear:
the chosen experts merged (:func:`merge_experts`). :func:`fold_experts` stores those merged linears in place of
the experts and gates (one per attribute row of :data:`ATTRIBUTES`, per modality, or per routed task);
:func:`dense_view` gives the plain dense model of one attribute row, which is all a graph that serves one row (an
ONNX export) needs. Both are for inference: training updates the experts and the gates, which a folded model no
longer has. Token and context routing decide from the hidden states, so their experts cannot be folded.
"""

from __future__ import annotations

import dataclasses

import torch

from uniperceiver_cli.model.config import ModelConfig
from uniperceiver_cli.model.layers import MLP, Attention
from uniperceiver_cli.model.moe import ATTRIBUTES, MODALITY_ROWS, ExpertLinear, merge_experts
from uniperceiver_cli.model.uniperceiver import UniPerceiver


@torch.no_grad()
def _merged(model: UniPerceiver, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Every expert linear's weights merged for ``keys`` (attribute rows, or tasks for task routing) by the model's
    gates in eval mode (no noise), by state key: weight (R, out, in), bias (R, out)."""
    merged = {}
    for name, module in model.named_modules():
        gate = module.gate if isinstance(module, (Attention, MLP)) else None
        if gate is None:
            continue
        training = gate.training
        try:
            decision = gate.eval()(keys)
        finally:
            gate.train(training)
        for child, linear in module.named_children():
            if isinstance(linear, ExpertLinear):
                weight, bias = merge_experts(linear.weight, linear.bias, *decision)
                merged[f"{name}.{child}.weight"], merged[f"{name}.{child}.bias"] = weight, bias
    return merged


def _rebuilt(model: UniPerceiver, config: ModelConfig, merged: dict[str, torch.Tensor]) -> UniPerceiver:
    """A model of ``config`` holding ``merged`` and every other tensor of ``model``, on its device and dtype."""
    reference = model.head.proj.weight
    rebuilt = UniPerceiver(config).to(reference.device, reference.dtype)
    source = model.state_dict()
    rebuilt.load_state_dict({key: merged[key] if key in merged else source[key] for key in rebuilt.state_dict()})
    rebuilt.targets = model.targets
    return rebuilt.eval()


def _refuse_token_features(config: ModelConfig) -> None:
    moe = config.moe
    if moe is not None and moe.data_dependent:
        raise ValueError(f"moe.routing {moe.routing!r} routes by token features: its experts cannot be folded")


def fold_experts(model: UniPerceiver) -> UniPerceiver:
    """A new model (in eval mode) whose expert linears hold one merged linear per key, routed by a parameter-free
    gate: per attribute row in the order of :data:`ATTRIBUTES` (attribute routing), per modality (visual, text)
    or per routed task in ``moe.tasks`` order (task routing). Its outputs are those of ``model`` in eval mode.

    Raises:
        ValueError: ``model`` is dense, already folded, or routed by token or context.
    """
    moe = model.config.moe
    if moe is None:
        raise ValueError("cannot fold the experts of a dense model: it has none")
    if moe.folded:
        raise ValueError("the model's experts are already folded")
    _refuse_token_features(model.config)
    keys = {"modality": MODALITY_ROWS, "task": tuple(moe.tasks)}.get(moe.routing, tuple(ATTRIBUTES))
    config = dataclasses.replace(model.config, moe=dataclasses.replace(moe, folded=True))
    return _rebuilt(model, config, _merged(model, keys))


def dense_view(model: UniPerceiver, row: str) -> UniPerceiver:
    """The dense model (``moe=None``, in eval mode) whose linears are ``model``'s expert linears merged for one
    attribute row, folded or not: it computes what ``model`` computes on inputs routed entirely through ``row``
    (e.g. "visual_input" for image and video features). A dense ``model`` is returned as it is.

    Raises:
        ValueError: ``row`` is not one of :data:`ATTRIBUTES`; the model routes by task (its experts depend on the
            task, not on the row), by token or by context.
    """
    if row not in ATTRIBUTES:
        raise ValueError(f"unknown attribute row {row!r}; known: {', '.join(ATTRIBUTES)}")
    moe = model.config.moe
    if moe is None:
        return model
    _refuse_token_features(model.config)
    if moe.routing == "task":
        raise ValueError("moe.routing 'task' routes by task, not by attribute row: no dense view serves one row "
                         "(fold_experts folds it per task)")
    merged = {key: value[0] for key, value in _merged(model, (row,)).items()}
    return _rebuilt(model, dataclasses.replace(model.config, moe=None), merged)
