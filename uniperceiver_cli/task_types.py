"""The task types: each one's input modality, family (how it is scored), MoE attribute rows and temperature.
Imports nothing heavy: the shards, the recipe schema and ``recipes ls`` read it without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TaskType:
    name: str
    modality: Literal["image", "video", "text"]  # of the input; the targets are text
    family: Literal["classification", "caption", "retrieval", "mlm", "text_classification", "vqa"]
    temperature: str  # its logit scale, one of model/heads.py TEMPERATURES
    attributes: tuple[str, ...]  # the MoE attribute rows (model/moe.py ATTRIBUTES) of its input, then its targets


TASKS = {task.name: task for task in (
    TaskType("image_classification", "image", "classification", "img_cls", ("visual_input", "text_target")),
    TaskType("video_classification", "video", "classification", "video_cls", ("visual_input", "text_target")),
    TaskType("image_caption", "image", "caption", "caption", ("caption_visual", "caption_text", "vocabulary")),
    TaskType("video_caption", "video", "caption", "caption", ("caption_visual", "caption_text", "vocabulary")),
    TaskType("image_retrieval", "image", "retrieval", "retrieve", ("visual_input", "text_target")),
    TaskType("video_retrieval", "video", "retrieval", "retrieve", ("visual_input", "text_target")),
    TaskType("text_mlm", "text", "mlm", "text_mlm", ("text_input", "vocabulary")),
    # GLUE as a cloze: the text holds a <|spe|> slot, scored at the MLM scale against label words as vocabulary rows
    # (the reference's rows: its text_classification input is the MLM input row, its label sets the word row).
    TaskType("text_classification", "text", "text_classification", "text_mlm", ("text_input", "vocabulary")),
    # VQA as a cloze on an image: [<|spe|>, image, question, <|spe|> slot, <|endoftext|>], the slot scored against
    # the answer set at the downstream scale. The reference has no rows for it; these follow its table's bits: the
    # visual segment of an image+text input (the captioning input's row), the question as a non-causal input text
    # segment of an image+text input (a row of its own), and the answers as word targets of an image+text task.
    TaskType("vqa", "image", "vqa", "downstream", ("caption_visual", "vqa_question", "vocabulary")),
)}


def task_names(modality: str, *families: str) -> list[str]:
    """The task types of a modality (of these families; default all), in table order: what a split serves."""
    return [t.name for t in TASKS.values() if t.modality == modality and (not families or t.family in families)]
