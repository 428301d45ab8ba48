"""VQA as a cloze on an image: the question's <|spe|> slot scored against the answer set. The loader (slots, drawn
answers, scores, the left/right flip), the MoE rows, the logits, the two training modes, a short fine-tuning on
ToyWorld's questions and its evaluation with the official accuracy."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from uniperceiver_cli.data.loader import SampleDecoder, flipped_answers, make_loader, swap_left_right
from uniperceiver_cli.data.shards import Skip
from uniperceiver_cli.data.toyworld import VQA_ANSWERS
from uniperceiver_cli.evaluate.tasks import evaluate_task
from uniperceiver_cli.model.config import EOT_ID, SPE_ID, get_config
from uniperceiver_cli.model.moe import ATTRIBUTES
from uniperceiver_cli.model.tokenizer import get_tokenizer
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.task_types import TASKS
from uniperceiver_cli.train.loop import train
from uniperceiver_cli.train.recipe import EvalTaskSpec, TaskSpec, validate
from uniperceiver_cli.train.tasks import TrainTask

IMAGENET = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _raw(question: str, targets: list[list[float]], answers: list[str], image: Image.Image) -> dict:
    data = io.BytesIO()
    image.save(data, format="PNG")
    meta = {"targets": targets, "answers": answers, "answer_type": "other"}
    return {"__key__": "k", "png": data.getvalue(), "txt": question.encode(), "json": json.dumps(meta).encode()}


class _Flip(random.Random):
    """An rng whose coin always says flip (random() < 0.5) or never."""

    def __init__(self, flip: bool) -> None:
        super().__init__(0)
        self.flip = flip

    def random(self) -> float:
        return 0.0 if self.flip else 0.99


def test_questions_carry_their_slot_answers_and_scores(toyworld_32: Path):
    split = toyworld_32 / "questions" / "train"
    assert json.loads((split / "manifest.json").read_text())["classes"] == VQA_ANSWERS
    batch = next(iter(make_loader(split, task="vqa", batch_size=8, image_size=32, train=True, answers=VQA_ANSWERS)))
    ids, slots, scores = batch["text_ids"], batch["slots"], batch["answer_scores"]
    assert (ids[torch.arange(8), slots] == SPE_ID).all() and batch["images"].shape == (8, 3, 32, 32)
    assert scores.shape == (8, len(VQA_ANSWERS)) and (scores.sum(1) == 1).all()  # one answer, all 10 humans agree
    assert (scores[torch.arange(8), batch["labels"]] == 1).all()
    batch = next(iter(make_loader(split, task="vqa", batch_size=8, image_size=32, train=False, answers=VQA_ANSWERS)))
    assert "labels" not in batch and all(len(a) == 10 for a in batch["answers"])
    assert batch["answer_types"][:5] == ["colour", "shape", "count", "position", "exists"]
    with pytest.raises(ValueError, match="needs the answer set"):
        make_loader(split, task="vqa", batch_size=8, image_size=32, train=False)


def test_a_drawn_answer_follows_the_scores():
    decoder = SampleDecoder(TASKS["vqa"], True, 32, 1, 1, 1, None, augment=False, max_text_len=23,
                            answers=("red", "blue", "green"))
    raw = _raw("what colour is it?", [[0, 0.3], [2, 0.9]], ["red"] + ["green"] * 3, Image.new("RGB", (32, 32)))
    rng = random.Random(0)
    drawn = [decoder(raw, rng)["label"] for _ in range(2000)]
    assert set(drawn) == {0, 2} and drawn.count(0) / 2000 == pytest.approx(0.25, abs=0.03)  # 0.3 / (0.3 + 0.9)
    sample = decoder(raw, rng)
    assert sample["ids"][-2:] == [SPE_ID, EOT_ID] and sample["targets"] == [(0, 0.3), (2, 0.9)]
    with pytest.raises(Skip, match="no answer in the answer set"):
        decoder(_raw("what?", [], ["purple"] * 10, Image.new("RGB", (32, 32))), rng)
    with pytest.raises(Skip, match="bad answer targets"):
        decoder(_raw("what?", [[7, 1.0]], ["x"] * 10, Image.new("RGB", (32, 32))), rng)


def test_bad_question_samples_are_counted_skips():
    train = SampleDecoder(TASKS["vqa"], True, 32, 1, 1, 1, None, augment=False, answers=("red", "blue"))
    evaluation = SampleDecoder(TASKS["vqa"], False, 32, 1, 1, 1, None, answers=("red", "blue"))
    image, rng = Image.new("RGB", (32, 32)), random.Random(0)
    raw = _raw("what colour?", [[0, 1.0]], ["red"] * 10, image)
    for decoder in (train, evaluation):
        with pytest.raises(Skip, match="bad json"):
            decoder({**raw, "json": b"[1, 2]"}, rng)
    for answers in (5, "red", [{"answer": "red"}]):
        with pytest.raises(Skip, match="bad answers"):
            evaluation(_raw("what colour?", [], answers, image), rng)
    for targets in ([[1.5, 1.0]], [[0, 2.0]], [[0]], "0"):
        with pytest.raises(Skip, match="bad answer targets"):
            train(_raw("what colour?", targets, ["red"] * 10, image), rng)
    assert evaluation(_raw("what?", [[7, 9.0]], ["red"] * 10, image), rng)["answers"] == ["red"] * 10  # unused
    # special tokens in a question are dropped: its own slot, at the end, is the only one
    sample = evaluation(_raw("what <|spe|> is <|endoftext|> this?", [], ["red"] * 10, image), rng)
    assert sample["ids"].count(SPE_ID) == 1 and sample["ids"][-2:] == [SPE_ID, EOT_ID]
    assert sample["ids"].count(EOT_ID) == 1


def test_the_flip_swaps_left_and_right_in_the_image_question_and_answers():
    assert swap_left_right("is the circle on the left or the right? Left.") == \
        "is the circle on the right or the left? right."
    assert swap_left_right("leftover rights") == "leftover rights"  # whole words only
    answers = ("left", "right", "top", "left side", "bottom left")
    assert flipped_answers(answers) == {0: 1, 1: 0, 2: 2, 3: None, 4: None}
    image = Image.new("RGB", (32, 32), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 8, 32))  # a red band on the left
    decoder = SampleDecoder(TASKS["vqa"], True, 32, 1, 1, 1, None, max_text_len=23, answers=answers)
    raw = _raw("where is the red band, left or right?", [[0, 1.0], [2, 0.3], [3, 0.3]], ["left"] * 10, image)
    kept, flipped = decoder(raw, _Flip(False)), decoder(raw, _Flip(True))
    assert kept["targets"] == [(0, 1.0), (2, 0.3), (3, 0.3)] and kept["input"][0, 0, 0] == 255
    assert flipped["targets"] == [(1, 1.0), (2, 0.3)]  # "left side" has no flipped answer: dropped
    assert flipped["input"][0, 0, -1] == 255 and flipped["input"][0, 0, 0] == 0  # the band is on the right
    lone = decoder(_raw("where is the red band?", [[3, 1.0]], ["left side"] * 10, image), _Flip(True))
    assert lone["targets"] == [(3, 1.0)] and lone["input"][0, 0, 0] == 255  # no mirror answer: not flipped
    from uniperceiver_cli.model.tokenizer import get_tokenizer

    assert get_tokenizer().decode(flipped["ids"][:-2]).strip() == "where is the red band , right or left ?"
    evaluation = SampleDecoder(TASKS["vqa"], False, 32, 1, 1, 1, None, max_text_len=23, answers=answers)
    assert evaluation(raw, _Flip(True))["input"][0, 0, 0] == 255  # never in evaluation


def test_the_moe_rows_follow_the_table():
    assert TASKS["vqa"].attributes == ("caption_visual", "vqa_question", "vocabulary")
    question = ATTRIBUTES["vqa_question"]
    # b0, b1: the input has an image and text; b5: a text segment; b6, b7 clear: an input, not causal
    assert question == (1, 1, 0, 1, 0, 1, 0, 0) and question not in [v for k, v in ATTRIBUTES.items()
                                                                   if k != "vqa_question"]
    assert ATTRIBUTES["caption_visual"] == (1, 1, 0, 1, 1, 0, 0, 0)


def test_vqa_logits_read_the_slot_of_one_call_routed_by_two_rows(monkeypatch: pytest.MonkeyPatch):
    torch.manual_seed(0)
    model = UniPerceiver(get_config("tiny-moe", image_size=32)).eval()
    images = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[320, 1929, SPE_ID, EOT_ID, 0], [320, 1929, 269, SPE_ID, EOT_ID]])
    padding, slots = ids == 0, torch.tensor([2, 3])
    calls = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda x, **kw: calls.append(kw["routing"]) or encode(x, **kw))
    with torch.no_grad():
        answers = model.answer_features(["red", "two dogs"])
        got = model.vqa_logits(images, ids, padding, slots, answers)
        alone = model.vqa_logits(images[:1], ids[:1, :4], None, slots[:1], answers)
    assert [c.rows for c in calls] == [("vocabulary",), ("caption_visual", "vqa_question"),
                                       ("caption_visual", "vqa_question")]
    assert calls[1].bounds == (1 + 4,)  # <|spe|> and the 2 x 2 patches, then the question
    torch.testing.assert_close(got[:1], alone, rtol=1e-5, atol=1e-5)  # the padding changes nothing
    assert got.shape == (2, 2)


@pytest.mark.parametrize("mode", ["sample", "soft"])
def test_the_training_loss_by_hand(toyworld_32: Path, mode: str):
    """The task's loss on a batch whose scores are spread over several answers: cross entropy on the drawn answer
    (label-smoothed), or against the scores normalised into a distribution."""
    smoothing = 0.1 if mode == "sample" else 0.0
    spec = TaskSpec(name="qa", type="vqa", data="questions/train", answer_targets=mode, label_smoothing=smoothing)
    task = TrainTask.build(spec, toyworld_32)
    batch = next(iter(make_loader(toyworld_32 / "questions" / "train", task="vqa", batch_size=4, image_size=32,
                                  train=True, augment=False, answers=task.answers)))
    scores = torch.zeros(4, len(VQA_ANSWERS))
    scores[:, :3] = torch.tensor([0.3, 0.9, 0.0])  # and each question's own answer at 1
    scores[torch.arange(4), batch["labels"]] = 1.0
    batch["answer_scores"] = scores
    torch.manual_seed(0)
    model = UniPerceiver(get_config("tiny", image_size=32)).eval()
    loss, metrics = task.loss(model, batch)
    ids, padding = get_tokenizer().encode_batch(VQA_ANSWERS)
    logits = model.vqa_logits(batch["images"].float().div(255).sub(IMAGENET).div(STD), batch["text_ids"], None,
                              batch["slots"], model.answer_features(ids, padding)).double()
    log_p = logits.log_softmax(-1)
    if mode == "soft":
        expected = -(scores.double() / scores.double().sum(1, keepdim=True) * log_p).sum(1).mean()
    else:
        nll = -log_p[torch.arange(4), batch["labels"]]
        expected = ((1 - smoothing) * nll - smoothing * log_p.mean(1)).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(metrics["acc"]) == pytest.approx(float(scores[torch.arange(4), logits.detach().argmax(-1)].mean()))
    with pytest.raises(ValueError, match="not a VQA task"):
        validate({"name": "t", "stage": "pretrain", "data_root": ".", "model": {"preset": "tiny"},
                  "tasks": [{"name": "c", "type": "image_caption", "data": "x", "answer_targets": "soft"}]})
    with pytest.raises(ValueError, match="label_smoothing does not apply"):
        TaskSpec(name="qa", type="vqa", data="x", answer_targets="soft", label_smoothing=0.1)


@pytest.mark.parametrize("mode", ["sample", "soft"])
def test_a_short_fine_tuning_and_its_evaluation(toyworld_32: Path, tmp_path: Path, mode: str):
    recipe = validate({"name": "vqa", "stage": "pretrain", "data_root": str(toyworld_32),
                       "tasks": [{"name": "qa", "type": "vqa", "data": "questions/train", "batch_size": 16,
                                  "max_text_len": 23, "answer_targets": mode}],
                       "model": {"preset": "tiny", "overrides": {"image_size": 32}},
                       "train": {"steps": 12, "log_every": 4, "lr": 1e-3, "warmup_steps": 0}})
    final = train(recipe, tmp_path / "run")
    records = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(0 < r["qa/loss"] < 5 and 0 <= r["qa/acc"] <= 1 for r in records)
    from uniperceiver_cli.checkpoints.loading import load_model

    spec = EvalTaskSpec(name="qa", type="vqa", data="questions/val", batch_size=8, max_text_len=23)
    result = evaluate_task(load_model(final), spec, toyworld_32).result
    types = {"colour", "shape", "count", "position", "exists"}
    assert result.num_samples == 32 and set(result.metrics) == {"vqa_accuracy"} | {f"vqa_accuracy/{t}" for t in types}
    truth = {p["key"]: p for p in result.predictions}
    metas = {}
    from uniperceiver_cli.data.shards import read_metas

    metas = read_metas(toyworld_32 / "questions" / "val")
    hits = sum(truth[key]["answer"] == meta["answers"][0] for key, meta in metas.items())
    assert result.metrics["vqa_accuracy"] == pytest.approx(100 * hits / 32)  # 10 agreeing humans: 1 or 0
