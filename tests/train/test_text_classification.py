"""Text classification as a cloze (GLUE's formulation): the <|spe|> slot of a prompt scored against one-token label
words as vocabulary rows, on ToyWorld's sentence splits: the loader, the logits, a short fine-tuning and its
evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from uniperceiver_cli.data.loader import SampleDecoder, make_loader
from uniperceiver_cli.data.shards import Skip
from uniperceiver_cli.data.toyworld import ANSWERS, SUMMARY, generate
from uniperceiver_cli.evaluate.tasks import evaluate_task
from uniperceiver_cli.model.config import SPE_ID, get_config
from uniperceiver_cli.model.tokenizer import cloze_ids, label_word_ids
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.task_types import TASKS
from uniperceiver_cli.train.loop import train
from uniperceiver_cli.train.recipe import EvalTaskSpec, validate


def test_prompts_carry_their_slot_and_label(toyworld_32: Path):
    batch = next(iter(make_loader(toyworld_32 / "sentences" / "train", task="text_classification", batch_size=8,
                                  image_size=32, train=False)))
    ids, slots = batch["text_ids"], batch["slots"]
    assert (ids[torch.arange(8), slots] == SPE_ID).all()
    assert set(batch["labels"].tolist()) <= {0, 1}
    assert json.loads((toyworld_32 / "sentences" / "train" / "manifest.json").read_text())["classes"] == ANSWERS
    labels = [int(b["labels"].sum()) for b in make_loader(toyworld_32 / "sentences" / "train", batch_size=64,
                                                           task="text_classification", image_size=32, train=False)]
    assert 20 < sum(labels) < 44  # about half of the 64 prompts' converses follow
    decoder = SampleDecoder(TASKS["text_classification"], False, 32, 1, 1, 1, None, max_text_len=8)
    sample = decoder({"__key__": "k", "txt": b"if a red circle is above a blue star, is the star below it? <|spe|>",
                      "cls": b"1"}, None)
    assert len(sample["ids"]) == 8 and sample["ids"][-2:] == [SPE_ID, 49407] and sample["label"] == 1
    assert cloze_ids(list(range(20)) + [SPE_ID] + list(range(30, 40)) + [49407], 10) == \
        [0, 1, 2, 3, 4, SPE_ID, 30, 31, 32, 49407]  # the slot's part to half, the text before it to the rest
    with pytest.raises(Skip, match="no <|spe|> slot"):
        decoder({"__key__": "k", "txt": b"a prompt without its slot", "cls": b"1"}, None)
    with pytest.raises(ValueError, match="label word 'counterintuitively' is 4 tokens"):
        label_word_ids(["bad", "counterintuitively"])


def test_cloze_logits_are_mlm_logits_at_the_slot():
    torch.manual_seed(0)
    model = UniPerceiver(get_config("tiny", image_size=32)).eval()
    ids = torch.tensor([[320, 1929, SPE_ID, 269, 49407, 0], [320, SPE_ID, 49407, 0, 0, 0]])
    padding = ids == 0
    words = model.vocabulary_targets(torch.tensor(label_word_ids(ANSWERS)))
    slots = torch.tensor([2, 1])
    with torch.no_grad():
        got = model.cloze_logits(ids, padding, slots, words)
        expected = model.mlm_logits(ids, padding, ids == SPE_ID, words)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.shape == (2, 2)


def test_a_short_fine_tuning_and_its_evaluation(toyworld_32: Path, tmp_path: Path):
    recipe = validate({"name": "cloze", "stage": "pretrain", "data_root": str(toyworld_32),
                       "tasks": [{"name": "follows", "type": "text_classification", "data": "sentences/train",
                                  "batch_size": 16, "max_text_len": 40, "label_smoothing": 0.1}],
                       "model": {"preset": "tiny", "overrides": {"image_size": 32}},
                       "train": {"steps": 12, "log_every": 4, "lr": 1e-3, "warmup_steps": 0}})
    final = train(recipe, tmp_path / "run")
    losses = [json.loads(line)["follows/loss"] for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(0 < loss < 2 for loss in losses)
    from uniperceiver_cli.checkpoints.loading import load_model

    spec = EvalTaskSpec(name="follows", type="text_classification", data="sentences/val", batch_size=8,
                        max_text_len=40)
    evaluation = evaluate_task(load_model(final), spec, toyworld_32)
    result = evaluation.result
    assert result.num_samples == 32 and set(result.metrics) == {"accuracy", "matthews", "f1"}
    assert 0 <= result.metrics["accuracy"] <= 100 and -100 <= result.metrics["matthews"] <= 100
    predicted = [p["predicted"] for p in result.predictions]
    hits = sum(p["predicted"] == p["label"] for p in result.predictions)
    assert set(predicted) <= set(ANSWERS) and result.metrics["accuracy"] == pytest.approx(100 * hits / 32)


@pytest.mark.parametrize(("version", "added"), [(2, ("sentences", "questions")), (3, ("questions",))])
def test_an_older_toyworld_gains_the_new_splits(tmp_path: Path, version: int, added: tuple[str, ...]):
    generate(tmp_path, size="tiny", image_size=16, num_frames=2, min_shards=1, progress=False)
    summary = json.loads((tmp_path / SUMMARY).read_text())
    old = {**summary, "version": version, "splits": {k: v for k, v in summary["splits"].items()
                                                     if not k.startswith(added)}}
    (tmp_path / SUMMARY).write_text(json.dumps(old))
    before = (tmp_path / "images" / "train" / "shard-000000.tar").read_bytes()
    generate(tmp_path, size="tiny", image_size=16, num_frames=2, min_shards=1, progress=False)
    assert json.loads((tmp_path / SUMMARY).read_text()) == summary
    assert (tmp_path / "images" / "train" / "shard-000000.tar").read_bytes() == before
    (tmp_path / SUMMARY).write_text(json.dumps({**old, "seed": 5}))
    with pytest.raises(ValueError, match="drawn with other settings"):
        generate(tmp_path, size="tiny", image_size=16, num_frames=2, min_shards=1, progress=False)
