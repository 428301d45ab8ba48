"""Presets, overrides, sizes, and forward + backward of every task type on the tiny preset."""

import dataclasses
import hashlib
import math

import pytest
import torch

import uniperceiver_cli as up
from uniperceiver_cli.model.config import PRESETS, ModelConfig, MoEConfig, PromptConfig, get_config
from uniperceiver_cli.model.uniperceiver import VOCABULARY, UniPerceiver, two_stream_mask

# Unique elements of the reference's state dicts, and what ours leaves out (docs/architecture.md):
# the frozen sin-cos table (a buffer rebuilt from the config), the unused video type row (folded into
# the patch bias), the never-used text type row 1, and 5 temperatures of task families never trained.
REFERENCE_ELEMENTS = {"base": 124_757_003, "large": 355_532_811, "base-moe": 422_668_811,
                      "large-moe": 1_414_205_451}


def _left_out(config: ModelConfig) -> int:
    d, grid = config.width, config.grid_size
    count = grid * grid * d + d + d + 5
    if config.moe is not None:  # the linear2 and self_attn.dense gates reuse another gate's decision
        gate = config.moe.attribute_length * d + d + 2 * d + config.moe.num_experts * d
        count += 2 * gate * sum(config.moe.is_moe_layer(i) for i in range(config.layers))
    return count


def _count(config: ModelConfig) -> int:
    with torch.device("meta"):
        return UniPerceiver(config).num_parameters()


@pytest.mark.parametrize("preset", sorted(REFERENCE_ELEMENTS))
def test_sizes_match_the_reference(preset):
    config = get_config(preset)
    assert _count(config) == REFERENCE_ELEMENTS[preset] - _left_out(config)


def test_documented_base_and_large_counts():
    assert _count(get_config("base")) == 124_604_934
    assert _count(get_config("large")) == 355_330_054


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_builds(preset):
    config = get_config(preset)
    with torch.device("meta"):
        model = UniPerceiver(config)
    assert len(model.blocks) == config.layers
    assert model.blocks[0].attn.qkv.weight.shape[-2:] == (3 * config.width, config.width)
    assert (model.blocks[0].attn.gate is not None) == (config.moe is not None)


def test_every_field_can_be_overridden():
    base = get_config("tiny")
    changed = {"width": 96, "layers": 2, "heads": 3, "mlp_dim": 128, "vocab_size": 49411, "max_text_len": 77,
               "image_size": 32, "patch_size": 8, "max_frames": 4, "pos_scale": 1.0, "layer_scale_init": 0.1,
               "drop_path": 0.2, "temperature_init": 0.05, "moe": {"num_experts": 2},
               "prompt": {"deep_prompt_length": 3}}
    assert set(changed) == {f.name for f in dataclasses.fields(ModelConfig)}
    config = get_config("tiny", **changed)
    for name, value in changed.items():
        if name == "moe":
            assert config.moe == MoEConfig(num_experts=2)
        elif name == "prompt":
            assert config.prompt == PromptConfig(deep_prompt_length=3)
        else:
            assert getattr(config, name) == value, name
    assert get_config("tiny-moe", moe={"top_k": 1}).moe == MoEConfig(num_experts=4, top_k=1)
    assert base.width == 64  # presets are not mutated
    model = up.create_model("tiny", image_size=32, layers=1)
    assert model.visual_embed.spatial.shape == (4, 64) and len(model.blocks) == 1


def test_bad_overrides_fail_clearly():
    with pytest.raises(ValueError, match="unknown model config field.*depth"):
        get_config("tiny", depth=3)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_config("huge")
    with pytest.raises(ValueError, match="not divisible by heads"):
        get_config("tiny", heads=5)
    with pytest.raises(ValueError, match="unknown MoEConfig field"):
        get_config("tiny", moe={"experts": 2})


def test_two_stream_mask_matches_the_reference_layout():
    # S i0 i1 | t0 t1 t2 | q0 q1 q2 ; "." may attend (reference doc, section 3.3)
    rows = ["...XXXXXX", "...XXXXXX", "...XXXXXX", "....XXXXX", ".....XXXX", "......XXX",
            "...XXX.XX", "....XXX.X", ".....XXX."]
    expected = torch.tensor([[c == "." for c in row] for row in rows])
    assert torch.equal(two_stream_mask(3, 3, 3), expected)


SIZE = 32


@pytest.fixture(params=["tiny", "tiny-moe"])
def model(request):
    torch.manual_seed(0)
    return up.create_model(request.param, image_size=SIZE, drop_path=0.1).train()


def test_classification_image_and_video_train(model):
    labels = torch.randint(0, 49406, (5, 4))
    images, video = torch.randn(2, 3, SIZE, SIZE), torch.randn(2, 3, 3, SIZE, SIZE)
    targets = model.encode_text(labels)
    loss = torch.nn.functional.cross_entropy(model.classification_logits(images, targets), torch.tensor([1, 3]))
    loss = loss + torch.nn.functional.cross_entropy(model.classification_logits(video, targets),
                                                    torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.visual_embed.patch.weight.grad.abs().sum() > 0
    assert model.head.logit_scale["img_cls"].grad != 0 and model.head.logit_scale["video_cls"].grad != 0


def _visual(kind, batch):
    shape = (batch, 3, SIZE, SIZE) if kind == "image" else (batch, 2, 3, SIZE, SIZE)
    return torch.randn(shape)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_retrieval_trains_both_directions(model, kind):
    images = _visual(kind, 3)
    ids = torch.randint(0, 49406, (3, 6))
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = True
    logits = model.retrieval_logits(images, ids, padding)
    assert logits.shape == (3, 3)
    target = torch.arange(3)
    loss = torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)
    loss.backward()
    assert model.head.logit_scale["retrieve"].grad != 0
    assert model.text_embed.word.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["image", "video"])
def test_captioning_and_mlm_train(model, kind):
    vocab_ids = torch.arange(300)
    vocabulary = model.encode_text(torch.stack([vocab_ids, torch.full_like(vocab_ids, 49407)], 1),
                                   routing=VOCABULARY)
    ids = torch.randint(0, 300, (2, 5))
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    logits = model.caption_logits(_visual(kind, 2), ids, padding, vocabulary)
    assert logits.shape == (2, 5, 300)
    loss = torch.nn.functional.cross_entropy(logits[~padding], ids[~padding])
    text = torch.randint(0, 300, (2, 8))
    selected = torch.zeros(2, 8, dtype=torch.bool)
    selected[:, [2, 5]] = True
    masked = text.masked_fill(selected, 49410)
    mlm = model.mlm_logits(masked, None, selected, vocabulary)
    assert mlm.shape == (4, 300)
    loss = loss + torch.nn.functional.cross_entropy(mlm, text[selected])
    loss.backward()
    assert model.head.logit_scale["caption"].grad != 0 and model.head.logit_scale["text_mlm"].grad != 0
    # every block's weights learn from these two tasks
    for block in model.blocks:
        assert block.attn.qkv.weight.grad.abs().sum() > 0 and block.mlp.fc2.weight.grad.abs().sum() > 0


def test_caption_queries_do_not_see_their_own_word():
    torch.manual_seed(0)
    model = up.create_model("tiny", image_size=SIZE).eval()
    vocabulary = torch.nn.functional.normalize(torch.randn(50, 64), dim=-1)
    images = torch.randn(1, 3, SIZE, SIZE)
    ids = torch.tensor([[5, 6, 7, 8]])
    changed = torch.tensor([[5, 6, 9, 8]])  # word 2 differs: queries 0..2 must not change, query 3 must
    with torch.no_grad():
        a = model.caption_logits(images, ids, None, vocabulary)
        b = model.caption_logits(images, changed, None, vocabulary)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3], b[:, 3])


def test_temperature_is_capped_at_100():
    model = up.create_model("tiny")
    with torch.no_grad():
        model.head.logit_scale["img_cls"].fill_(6.0)  # exp(6) = 403
    scale = model.head.scale("img_cls")
    assert scale.item() == 100.0
    scale.backward()
    assert model.head.logit_scale["img_cls"].grad == 0


def test_prompt_tuning_parameters():
    torch.manual_seed(0)
    config = {"deep_prompt_length": 4, "separate_target_prompts": True, "spe_bias": True,
              "classifier_classes": 7}
    model = up.create_model("tiny", image_size=SIZE, prompt=config).eval()
    assert model.blocks[0].prompt.shape == (4, 64) and model.blocks[0].target_prompt.shape == (4, 64)
    images = torch.randn(2, 3, SIZE, SIZE)
    targets = torch.nn.functional.normalize(torch.randn(7, 64), dim=-1)
    with torch.no_grad():
        before = model.classification_logits(images, targets)
        model.blocks[1].prompt.add_(torch.randn(4, 64))  # deep prompts change the input's encoding
        after = model.classification_logits(images, targets)
        assert not torch.allclose(before, after)
        text = torch.tensor([[10, 11, 49407]])
        t1 = model.encode_text(text)
        model.blocks[1].target_prompt.add_(torch.randn(4, 64))  # the target side has its own prompts
        assert not torch.allclose(t1, model.encode_text(text))
        model.text_embed.spe_bias.add_(torch.randn(64))
        assert not torch.allclose(after, model.classification_logits(images, targets))
    # the classifier prompt starts at zero: logits are the similarity logits until it learns
    assert model.head.fc_prompt.weight.abs().sum() == 0


def test_bf16_autocast_forward_stays_close_to_fp32():
    torch.manual_seed(0)
    model = up.create_model("tiny-moe", image_size=SIZE).eval()
    images, labels = torch.randn(2, 3, SIZE, SIZE), torch.randint(0, 49406, (4, 3))
    with torch.no_grad():
        reference = model.classification_logits(images, model.encode_text(labels))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.classification_logits(images, model.encode_text(labels))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, atol=0.3, rtol=0.05)


def test_model_moves_to_another_dtype():
    torch.manual_seed(0)
    model = up.create_model("tiny-moe", image_size=SIZE).eval().to(torch.bfloat16)
    with torch.no_grad():
        feats = model.encode_image(torch.randn(2, 3, SIZE, SIZE, dtype=torch.bfloat16))
    assert feats.dtype == torch.bfloat16 and torch.isfinite(feats).all()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"drop_path": 5}, r"drop_path must be a finite number in \[0.0, 1.0\), got 5"),
    ({"temperature_init": 0}, r"temperature_init must be a finite number in \(0.0, inf\), got 0"),
    ({"pos_scale": float("nan")}, "pos_scale must be a finite number"),
    ({"layer_scale_init": -1.0}, "layer_scale_init must be a finite number"),
    ({"moe": {"top_k": 9}}, "moe.top_k 9 is larger than moe.num_experts 4"),
    ({"moe": {"noise_std": -1}}, "noise_std must be a finite number"),
    ({"moe": {"location": "even"}}, "moe.location must be"),
    ({"prompt": {"deep_prompt_length": -1}}, "deep_prompt_length must be an integer >= 0, got -1"),
    ({"prompt": {"classifier_classes": 2.5}}, "classifier_classes must be an integer >= 0"),
    ({"width": 10**400}, "width must be at most 65536, got an integer of about 400 digits"),
    ({"layers": 1025}, "layers must be at most 1024, got 1025"),
    ({"heads": 512}, "heads must be at most 256, got 512"),
    ({"mlp_dim": 65537}, "mlp_dim must be at most 65536"),
    ({"vocab_size": 10**7 + 1}, "vocab_size must be at most 10000000"),
    ({"max_text_len": 65537}, "max_text_len must be at most 65536"),
    ({"image_size": 16384}, "image_size must be at most 8192"),
    ({"max_frames": 4097}, "max_frames must be at most 4096"),
    ({"layer_scale_init": 1e300}, r"layer_scale_init must be a finite number in \[0.0, 1000.0\], got 1e\+300"),
    ({"pos_scale": 1e4}, "pos_scale must be a finite number in"),
    ({"moe": {"num_experts": 4097}}, "num_experts must be at most 4096"),
    ({"moe": {"attribute_length": 1025}}, "attribute_length must be at most 1024"),
    ({"moe": {"capacity_factor": 1e300}}, r"capacity_factor must be a finite number in \(0.0, 4096\]"),
    ({"moe": {"noise_std": 1e300}}, "noise_std must be a finite number in"),
    ({"moe": {"routing": "task", "tasks": [f"t{i}" for i in range(4097)]}}, "moe.tasks must name at most 4096 tasks"),
    ({"prompt": {"deep_prompt_length": 4097}}, "deep_prompt_length must be at most 4096"),
    ({"prompt": {"classifier_classes": 10**8}}, "classifier_classes must be at most 10000000"),
])
def test_config_values_out_of_range_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_config("tiny-moe", **overrides)


@pytest.mark.parametrize("overrides", [
    {"moe": {"location": "x" * 10_000}}, {"moe": {"routing": "task", "tasks": ["t"] * 10_000}},
    {"layer_scale_init": "y" * 10_000}, {"z" * 10_000: 1},
])
def test_a_config_error_shows_at_most_80_characters_of_a_value(overrides):
    with pytest.raises(ValueError) as error:
        get_config("tiny-moe", **overrides)
    assert len(str(error.value)) < 200 and "..." in str(error.value)


VARIANTS = [
    *([preset, {}] for preset in PRESETS),
    *(["tiny-moe", {"moe": {"routing": routing, "location": "all"}}] for routing in ("modality", "token", "context")),
    ["tiny-moe", {"layers": 5, "moe": {"routing": "task", "tasks": ["a", "b", "c"], "location": "four"}}],
    *(["tiny-moe", {"moe": {"routing": routing, "folded": True}}] for routing in ("attribute", "modality")),
    ["tiny-moe", {"moe": {"routing": "task", "tasks": ["a", "b", "c"], "folded": True}}],
    ["tiny", {"prompt": {"deep_prompt_length": 3, "separate_target_prompts": True, "spe_bias": True,
                         "classifier_classes": 7}, "mlp_dim": 100, "max_frames": 3, "max_text_len": 40,
              "vocab_size": 500, "patch_size": 8, "image_size": 32}],
    ["base-moe", {"prompt": {"deep_prompt_length": 10}, "moe": {"attribute_length": 5}}],
]


@pytest.mark.parametrize(("preset", "overrides"), VARIANTS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(VARIANTS)])
def test_num_parameters_is_the_built_models_count(preset, overrides):
    config = get_config(preset, **overrides)
    with torch.device("meta"):
        model = UniPerceiver(config)
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())


def test_parameter_roles_of_the_tiny_preset():
    prompt = {"deep_prompt_length": 2, "separate_target_prompts": True, "spe_bias": True, "classifier_classes": 5}
    model = up.create_model("tiny", prompt=prompt)
    blocks = [f"blocks.{i}." for i in range(3)]
    decayed = {"visual_embed.patch.weight", "head.proj.weight", "head.fc_prompt.weight",
               *(b + n for b in blocks for n in ("attn.qkv.weight", "attn.out.weight", "mlp.fc1.weight",
                                                 "mlp.fc2.weight"))}
    assert model.no_weight_decay() == {n for n, _ in model.named_parameters()} - decayed
    fresh = {"text_embed.spe_bias", "head.ln_post.weight", "head.ln_post.bias", "head.fc_prompt.weight",
             "head.fc_prompt.bias", "head.similarity_weight",
             *(b + n for b in blocks for n in ("prompt", "target_prompt"))}
    norms = {"embed_norm.weight", "embed_norm.bias",
             *(f"{b}norm{k}.{w}" for b in blocks for k in (1, 2) for w in ("weight", "bias"))}
    assert model.prompt_parameters(encoder_norms=False) == fresh
    assert model.prompt_parameters() == fresh | norms
    assert up.create_model("tiny").prompt_parameters() == norms | {"head.ln_post.weight", "head.ln_post.bias"}
    moe = up.create_model("tiny-moe")  # the gates take no weight decay and stay frozen in prompt tuning
    gates = {f"blocks.{i}.{part}.gate.{w}" for i in (0, 2) for part in ("attn", "mlp")
             for w in ("tag_proj.weight", "tag_proj.bias", "tag_norm.weight", "tag_norm.bias", "router.weight")}
    assert gates <= moe.no_weight_decay() and not gates & moe.prompt_parameters()
    assert moe.prompt_parameters() == up.create_model("tiny").prompt_parameters()


def test_init_takes_the_qkv_bound_by_role_not_shape():
    torch.manual_seed(0)
    block = up.create_model("tiny", mlp_dim=192).blocks[0]  # fc1 is 64 -> 3 * 64, the shape of a fused QKV
    plain, qkv = math.sqrt(6 / (64 + 192)), math.sqrt(6 / (64 + 64))
    assert block.mlp.fc1.weight.abs().max() <= plain < block.attn.qkv.weight.abs().max() <= qkv


@pytest.mark.parametrize(("preset", "digest"), [("tiny", "c939220382eb5cee"), ("tiny-moe", "d42a564aead33cd5")])
def test_default_init_is_unchanged(preset, digest):
    torch.manual_seed(0)
    sha = hashlib.sha256()
    for name, tensor in UniPerceiver(get_config(preset)).state_dict().items():
        sha.update(name.encode())
        sha.update(tensor.numpy().tobytes())
    assert sha.hexdigest()[:16] == digest  # recorded before the QKV init was chosen by role
