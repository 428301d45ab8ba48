"""The task-type table agrees with the model's temperatures and attribute rows, and the schema and shards read it."""

import typing

from uniperceiver_cli.model.heads import TEMPERATURES
from uniperceiver_cli.model.moe import ATTRIBUTES
from uniperceiver_cli.task_types import TASKS, task_names
from uniperceiver_cli.train.recipe import TaskType


def test_every_task_type_names_a_temperature_and_attribute_rows_of_the_model():
    for task in TASKS.values():
        assert task.temperature in TEMPERATURES, task
        assert set(task.attributes) <= set(ATTRIBUTES), task
        assert task.name.startswith(task.modality) or task.name == "vqa"  # the names say it too (VQA: on images)


def test_the_recipe_schema_and_the_splits_take_the_table_names():
    assert typing.get_args(TaskType) == tuple(TASKS)
    assert task_names("image") == ["image_classification", "image_caption", "image_retrieval", "vqa"]
    assert task_names("video", "caption", "retrieval") == ["video_caption", "video_retrieval"]
    assert task_names("text") == ["text_mlm", "text_classification"]
    assert task_names("text", "mlm") == ["text_mlm"]  # what a corpus split serves
