"""The reference's checkpoint formats: their key names mapped onto ours (docs/checkpoints.md lists the map), whose
naming a state dict follows, and the model config that fits converted weights. No file is read here."""

from __future__ import annotations

import re
from typing import Any

import torch

from uniperceiver_cli.checkpoints.errors import CheckpointError
from uniperceiver_cli.model.config import PRESETS, ModelConfig, get_config
from uniperceiver_cli.model.heads import TEMPERATURES

# DeepSpeed-era key fragments -> the reference's "torch" names (tools/convert_checkpoint.py, convertmoe.ipynb).
_DS_RENAMES = (
    ("encoder.", "fused_encoder."),
    ("attention.self.qkv_proj", "self_attn.qkv_proj"),
    ("attention.output.dense", "self_attn.dense"),
    ("attention_output.residual_scale", "gamma_1"),
    ("ffn.dense.", "linear1."),
    ("ffn.dense2.", "linear2."),
    ("ffn_output.residual_scale", "gamma_2"),
    ("LayerNormModules.0.", "norm1."),
    ("LayerNormModules.1.", "norm2."),
    ("predictor.", "loss_prepare."),
    ("deepspeed_moe.gate", "gate"),
    ("deepspeed_moe.experts", "experts"),
)

_LAYER = r"^fused_encoder\.layers\.(\d+)\."
# The reference's "torch" names -> ours. Expert keys carry the expert index as a second group.
_RENAMES = (
    (_LAYER + r"gamma_([12])$", r"blocks.\1.gamma\2"),
    (_LAYER + r"norm([12])\.(weight|bias)$", r"blocks.\1.norm\2.\3"),
    (_LAYER + r"self_attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (_LAYER + r"self_attn\.(?:out_proj|dense)\.(weight|bias)$", r"blocks.\1.attn.out.\2"),
    (_LAYER + r"self_attn\.qkv_proj\.(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (_LAYER + r"linear([12])\.(weight|bias)$", r"blocks.\1.mlp.fc\2.\3"),
    (_LAYER + r"self_attn\.qkv_proj\.gate\.", r"blocks.\1.attn.gate."),
    (_LAYER + r"linear1\.gate\.", r"blocks.\1.mlp.gate."),
    (_LAYER + r"deep_prompt_embedding\.embedding\.weight$", r"blocks.\1.prompt"),
    (_LAYER + r"deep_prompt_embedding\.target_embedding\.weight$", r"blocks.\1.target_prompt"),
    (r"^token_embed\.embeddings\.weight$", "text_embed.word.weight"),
    (r"^token_embed\.embeddings_pos\.position_embeddings\.weight$", "text_embed.position.weight"),
    (r"^token_embed\.embeddings_token_type\.weight$", "text_embed.text_type"),
    (r"^token_embed\.embeddings_norm\.(weight|bias)$", r"embed_norm.\1"),
    (r"^video_embed\.embeddings\.(weight|bias)$", r"visual_embed.patch.\1"),
    (r"^video_embed\.embeddings_st_pos\.temporal_pos_embed\.weight$", "visual_embed.temporal.weight"),
    (r"^loss_prepare\.(ln_post|proj)\.(weight|bias)$", r"head.\1.\2"),
    (r"^loss_prepare\.logit_scale_(\w+)$", r"head.logit_scale.\1"),
    (r"^s_token_bias$", "text_embed.spe_bias"),
    (r"^(?:loss_prepare\.)?fc_prompt\.(weight|bias)$", r"head.fc_prompt.\1"),
    (r"^(?:loss_prepare\.)?similarity_weight$", "head.similarity_weight"),
)
_GATE_PARTS = (("tag_transform.0.", "tag_proj."), ("tag_transform.1.", "tag_norm."), ("wg.", "router."))
_EXPERT = re.compile(_LAYER + r"(self_attn\.qkv_proj|self_attn\.dense|linear1|linear2)\.experts\."
                     r"deepspeed_experts\.(\d+)\.(weight|bias)$")
_EXPERT_TARGET = {"self_attn.qkv_proj": "attn.qkv", "self_attn.dense": "attn.out",
                  "linear1": "mlp.fc1", "linear2": "mlp.fc2"}
# Present in official files, unused by the reference at inference; we do not keep them.
_DROPPED = (
    re.compile(_LAYER + r"(self_attn\.dense|linear2)\.gate\."),  # these reuse the qkv / linear1 decision
    re.compile(r"^video_embed\.embeddings_norm\."),  # the same tensor as token_embed.embeddings_norm
    re.compile(r"^video_embed\.embeddings_st_pos\.spatial_pos_embed\.weight$"),  # frozen sin-cos, rebuilt
    re.compile(r"^video_embed\.embeddings_type\.weight$"),  # folded into the patch bias, or unused
    re.compile(r"^visual_embed"),  # dropped by the reference's converter
)


def _official_name(key: str) -> str | None:
    """Our name for a key in the reference's "torch" naming, or None when it is not one we know."""
    for pattern, target in _RENAMES:
        if re.match(pattern, key):
            name = re.sub(pattern, target, key)
            for old, new in _GATE_PARTS:  # only a router's names hold them
                name = name.replace("gate." + old, "gate." + new)
            return name
    return None


# Whose names a state dict follows: ours, or the reference's (either format, before renaming).
_OUR_PREFIXES = ("blocks.", "text_embed.", "embed_norm.", "head.")
_REFERENCE_PREFIXES = ("fused_encoder.", "encoder.", "token_embed.", "video_embed.", "loss_prepare.", "predictor.")


def key_naming(keys: Any) -> str:
    """"ours", "reference" or "unknown": whose names a state dict's keys are."""
    keys = [k for k in keys if isinstance(k, str)]
    ours = any(k.startswith(_OUR_PREFIXES) for k in keys)
    reference = any(k.startswith(_REFERENCE_PREFIXES) for k in keys)
    return "ours" if ours and not reference else "reference" if reference and not ours else "unknown"


def convert_official(state: dict[str, torch.Tensor], fmt: str, fold_video_type: bool | None = None,
                     ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Map an official state dict onto our names.

    Args:
        state: the state dict from :func:`read_official`.
        fmt: "torch" or "ds". DeepSpeed keys are first renamed the way the reference's converters do.
        fold_video_type: add ``video_embed.embeddings_type`` to the patch bias (exact: both come before the
            LayerNorm). Default: fold for "ds" files, whose models added it; ignore for "torch" files,
            whose converter already folded it. A MoE "-withvtype" torch file needs ``True``.

    Returns:
        Our state dict, the official keys we did not recognise, and those dropped by design.
    """
    if fmt not in ("torch", "ds"):
        raise ValueError(f"official format must be 'torch' or 'ds', got {fmt!r}")
    if fold_video_type is None:
        fold_video_type = fmt == "ds"
    renamed = {}
    for key, value in state.items():
        if fmt == "ds":
            for old, new in _DS_RENAMES:
                key = key.replace(old, new)
            if key.endswith(("gamma_1", "gamma_2")):
                value = value.reshape(-1)
        renamed[key] = value.float() if value.is_floating_point() else value
    ours: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    unknown, dropped = [], []
    for key, value in renamed.items():
        if expert := _EXPERT.match(key):
            layer, part, index, kind = expert.groups()
            experts.setdefault(f"blocks.{layer}.{_EXPERT_TARGET[part]}.{kind}", {})[int(index)] = value
            continue
        if any(p.match(key) for p in _DROPPED):
            dropped.append(key)
            continue
        name = _official_name(key)
        if name is None:
            unknown.append(key)
            continue
        if name.startswith("head.logit_scale.") and name.rsplit(".", 1)[1] not in TEMPERATURES:
            dropped.append(key)  # temperatures of task families the reference never trained
            continue
        if name == "text_embed.text_type":
            value = value[0]  # text always uses type row 0
        elif name == "text_embed.spe_bias":
            value = value.reshape(-1)
        ours[name] = value
    for name, by_index in experts.items():
        if sorted(by_index) != list(range(len(by_index))):
            unknown.append(f"{name} (expert indices {sorted(by_index)} are not 0..{len(by_index) - 1})")
            continue
        ours[name] = torch.stack([by_index[i] for i in range(len(by_index))])
    vtype = renamed.get("video_embed.embeddings_type.weight")
    if fold_video_type and vtype is not None and "visual_embed.patch.bias" in ours:
        ours["visual_embed.patch.bias"] = ours["visual_embed.patch.bias"] + vtype[0]
    return ours, unknown, dropped


def preset_of(width: int, layers: int, mlp_dim: int, moe: bool) -> str | None:
    """The preset of these shapes (dense or MoE), if there is one."""
    return next((name for name, p in PRESETS.items()
                 if (p["width"], p["layers"], p["mlp_dim"], p.get("moe") is not None) == (width, layers, mlp_dim, moe)),
                None)


def infer_config(state: dict[str, torch.Tensor], **overrides: object) -> ModelConfig:
    """A model config matching converted official weights: a preset of the same shape, else heads of 64."""
    width = state["text_embed.word.weight"].shape[1]
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    mlp = state["blocks.0.mlp.fc1.weight"].shape[-2]
    expert_keys = [k for k in state if k.endswith("mlp.fc1.weight") and state[k].dim() == 3]
    moe = None
    if expert_keys:
        moe_layers = sorted(int(k.split(".")[1]) for k in expert_keys)
        location = {tuple(range(0, layers, 2)): "odd", tuple(range(0, layers, 4)): "four",
                    tuple(range(layers)): "all"}.get(tuple(moe_layers))
        if location is None:
            raise CheckpointError(f"experts at layers {moe_layers} match no supported moe.location")
        moe = {"num_experts": state[expert_keys[0]].shape[0], "location": location}
    preset = preset_of(width, layers, mlp, moe is not None)
    prompt = {}
    if "blocks.0.prompt" in state:
        prompt["deep_prompt_length"] = state["blocks.0.prompt"].shape[0]
        prompt["separate_target_prompts"] = "blocks.0.target_prompt" in state
    if "text_embed.spe_bias" in state:
        prompt["spe_bias"] = True
    if "head.fc_prompt.weight" in state:
        prompt["classifier_classes"] = state["head.fc_prompt.weight"].shape[0]
    found: dict[str, object] = {"width": width, "layers": layers, "mlp_dim": mlp,
                                "max_text_len": state["text_embed.position.weight"].shape[0],
                                "vocab_size": state["text_embed.word.weight"].shape[0],
                                "max_frames": state["visual_embed.temporal.weight"].shape[0],
                                "patch_size": state["visual_embed.patch.weight"].shape[-1]}
    if preset is None:
        found["heads"] = max(1, width // 64)
    if moe is not None:
        found["moe"] = moe
    if prompt:
        found["prompt"] = prompt
    return get_config(preset or "base", **{**found, **overrides})

