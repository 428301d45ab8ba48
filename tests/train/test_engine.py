"""The training loop on tiny ToyWorld: exact resume, prompt tuning, fine-tuning, checkpoints, target sets."""

import json

import pytest
import torch
from safetensors.torch import load_file

from uniperceiver_cli.data.toyworld import generate
from uniperceiver_cli.train.loop import Context, SingleEngine, build_model, train
from uniperceiver_cli.train.optim import build_optimizer, build_scheduler
from uniperceiver_cli.train.recipe import validate
from uniperceiver_cli.train.tasks import TrainTask

TASKS = [
    {"name": "shape", "type": "image_classification", "data": "images/train", "label_set": "shape",
     "batch_size": 8, "augment": False},
    {"name": "caption", "type": "image_caption", "data": "images/train", "batch_size": 4, "vocabulary": "corpus",
     "augment": False},
    {"name": "retrieval", "type": "image_retrieval", "data": "images/train", "batch_size": 8, "augment": False},
    {"name": "mlm", "type": "text_mlm", "data": "text/train", "batch_size": 4, "max_text_len": 32,
     "vocabulary": "sampled", "negatives": 64},
    {"name": "motion", "type": "video_classification", "data": "videos/train", "label_set": "motion",
     "batch_size": 4, "num_frames": 4, "frame_stride": 3.75, "augment": False},
]


@pytest.fixture(scope="module")
def toyworld(tmp_path_factory):
    root = tmp_path_factory.mktemp("toyworld")
    generate(root, size="tiny", image_size=32, num_frames=4, min_shards=2, progress=False)
    return root


def _recipe(root, stage="pretrain", **train):
    data = {"name": "t", "stage": stage, "data_root": str(root), "tasks": TASKS,
            "model": {"preset": "tiny", "overrides": {"image_size": 32, "layers": 2, "max_frames": 4}},
            "train": {"steps": 6, "lr": 1e-3, "warmup_steps": 2, "log_every": 1, "grad_clip": 1.0, **train}}
    return validate(data)


def _losses(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_exactly(toyworld, tmp_path):
    full = train(_recipe(toyworld, checkpoint_every=2), tmp_path / "full")
    part = tmp_path / "part"
    train(_recipe(toyworld, checkpoint_every=2), part, stop_after=3)  # interrupted after step 3
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    resumed = train(_recipe(toyworld, checkpoint_every=2), part, resume="auto")
    def timeless(run):
        return [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in _losses(run)]

    assert timeless(part) == timeless(tmp_path / "full")  # the same tasks, losses and rates at every step
    assert len(timeless(part)) == 6
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]


def test_prompt_tuning_trains_only_prompts_and_finetuning_everything(toyworld, tmp_path):
    base = train(_recipe(toyworld, steps=2), tmp_path / "base")
    prompt = _recipe(toyworld, steps=2).to_dict()
    prompt.update(stage="prompt-tune", init=str(base))
    prompt["model"]["overrides"]["prompt"] = {"deep_prompt_length": 2, "spe_bias": True}
    tuned = load_file(train(validate(prompt), tmp_path / "prompt") / "model.safetensors")
    start = load_file(base / "model.safetensors")
    assert torch.equal(tuned["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])
    assert torch.equal(tuned["text_embed.word.weight"], start["text_embed.word.weight"])
    assert not torch.equal(tuned["blocks.0.norm1.weight"], start["blocks.0.norm1.weight"])
    assert tuned["blocks.0.prompt"].shape == (2, 64) and tuned["text_embed.spe_bias"].abs().sum() > 0
    finetune = _recipe(toyworld, steps=2).to_dict()
    finetune.update(stage="finetune", init=str(base))
    tuned = load_file(train(validate(finetune), tmp_path / "finetune") / "model.safetensors")
    assert not torch.equal(tuned["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])


def test_run_directory_contents(toyworld, tmp_path, monkeypatch):
    calls = []
    set_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), set_threads(n)))
    before = torch.get_num_threads()
    recipe = _recipe(toyworld, steps=4, checkpoint_every=1, keep_checkpoints=2, threads=1).to_dict()
    recipe["evaluation"] = {"tasks": [{"name": "shape", "type": "image_classification", "data": "images/test",
                                       "label_set": "shape"}]}
    run = tmp_path / "run"
    train(validate(recipe), run)
    assert (run / "config.yaml").exists() and (run / "final" / "config.json").exists()
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-0000003", "step-0000004"]
    assert any((run / "tensorboard").iterdir())
    summary = json.loads((run / "eval" / "final" / "summary.json").read_text())
    assert 0 <= summary["results"]["shape"]["acc@1"] <= 100
    records = _losses(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all("lr" in r for r in records)
    assert calls == [1, before] and torch.get_num_threads() == before  # train.threads only while training


def test_sparse_word_gradient_steps_like_dense(toyworld):
    """The engine's sparse word-table gradients (added into one kept buffer) step as dense ones, to rounding."""
    recipe = _recipe(toyworld, steps=3, warmup_steps=0)
    torch.manual_seed(0)
    dense_model = build_model(recipe)
    sparse_model = build_model(recipe)
    sparse_model.load_state_dict(dense_model.state_dict())
    engine = SingleEngine(sparse_model, recipe, Context())
    optimizer = build_optimizer(dense_model, recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train)
    caption = TrainTask.build(recipe.tasks[1], toyworld)
    batch = {"images": torch.randn(4, 1, 3, 32, 32), "keys": list("abcd"),
             "text_ids": torch.tensor([[320, 1929, 530, 49407]] * 4), "text_padding": torch.zeros(4, 4, dtype=bool)}
    for _ in range(2):  # the second step reuses the buffer: it must start from zero again
        engine.backward(caption.loss(engine.model, batch)[0])
        assert engine.model.text_embed.word.weight.grad.is_sparse
        engine.step()
        caption.loss(dense_model, batch)[0].backward()
        torch.nn.utils.clip_grad_norm_(dense_model.parameters(), recipe.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    # Adam turns a rounding difference in a near-zero gradient into up to lr-sized steps: compare to 1e-4 (lr 1e-3)
    for (name, a), b in zip(dense_model.state_dict().items(), sparse_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")


def test_activation_checkpointing_trains_the_same(toyworld, tmp_path):
    """Every task of the mix, per-block checkpointing on and off: the same losses and the same weights."""
    plain = train(_recipe(toyworld, steps=3), tmp_path / "plain")
    checkpointed = train(_recipe(toyworld, steps=3, activation_checkpointing=True), tmp_path / "checkpointed")
    timeless = [[{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in _losses(run.parent)]
                for run in (plain, checkpointed)]
    assert timeless[0] == timeless[1]
    a, b = load_file(plain / "model.safetensors"), load_file(checkpointed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
