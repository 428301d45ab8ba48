"""A run records what it trained over: the classifier prompt's class names and the caption target set."""

import json

import pytest

import uniperceiver_cli as up
from uniperceiver_cli.data.corpus import vocabulary_of
from uniperceiver_cli.data.toyworld import SHAPES, generate
from uniperceiver_cli.train.loop import train
from uniperceiver_cli.train.recipe import validate
from uniperceiver_cli.train.tasks import TrainTask

SHAPE = {"name": "shape", "type": "image_classification", "data": "images/train", "label_set": "shape",
         "batch_size": 4, "augment": False}
CAPTION = {"name": "caption", "type": "image_caption", "data": "images/train", "batch_size": 2,
           "vocabulary": "corpus", "augment": False}


@pytest.fixture(scope="module")
def toyworld(tmp_path_factory):
    root = tmp_path_factory.mktemp("toyworld")
    generate(root, size="tiny", image_size=32, num_frames=4, min_shards=2, progress=False)
    return root


def _recipe(root, tasks, classes=len(SHAPES)):
    return validate({"name": "t", "stage": "pretrain", "data_root": str(root), "tasks": tasks,
                     "model": {"preset": "tiny", "overrides": {"image_size": 32, "layers": 1, "max_frames": 4,
                                                               "prompt": {"classifier_classes": classes}}},
                     "train": {"steps": 1, "log_every": 1}})


def _tasks(root, *specs):
    return [TrainTask.build(spec, root) for spec in _recipe(root, list(specs)).tasks]


def test_a_run_records_class_names_and_the_corpus_vocabulary(toyworld, tmp_path):
    final = train(_recipe(toyworld, [SHAPE, CAPTION]), tmp_path / "run")
    targets = json.loads((final / "config.json").read_text())["targets"]
    assert targets["class_names"] == list(SHAPES)
    assert targets["caption_vocabulary"] == vocabulary_of([toyworld / "images" / "train"]).tolist()
    model = up.load_model(final)
    assert model.class_names == list(SHAPES) and model.classifier_rows(["star", "circle"]).tolist() == [3, 0]


def test_what_is_left_unrecorded(toyworld):
    model = up.create_model("tiny", image_size=32, prompt={"classifier_classes": len(SHAPES)})
    full = {**CAPTION, "name": "full", "vocabulary": "full"}
    colour = {**SHAPE, "name": "colour", "label_set": "colour"}
    TrainTask.record_targets(model, _tasks(toyworld, SHAPE, colour, CAPTION, full))
    assert model.class_names is None  # two class lists shared the classifier's rows
    assert model.caption_vocabulary is None  # one caption task trained over the whole vocabulary
    model.class_names = ["kept"] * len(SHAPES)
    TrainTask.record_targets(model, _tasks(toyworld, CAPTION))  # no classification task: rows as they were
    assert model.class_names == ["kept"] * len(SHAPES) and model.caption_vocabulary is not None
    plain = up.create_model("tiny", image_size=32)
    assert TrainTask.record_targets(plain, _tasks(toyworld, SHAPE)).class_names is None  # no classifier prompt
