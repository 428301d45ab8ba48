"""``uniperceiver recipes plan``: the traced activations against a real step, the model-state arithmetic and the
exit codes."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from uniperceiver_cli.cli.recipes import app
from uniperceiver_cli.train.catalogue import load_checked
from uniperceiver_cli.train.plan import default_gpus, measure_step, model_states, plan_recipe, within
from uniperceiver_cli.train.recipe import validate

# The planned saved activations of a task's step are within this fraction of a real step's (docs/performance.md).
# Classification, retrieval and captioning trace exactly; MLM scores a random number of masked tokens.
TOLERANCE = 0.02

# toyworld-tiny without its data folder (class names, corpora: the plan's assumptions) and with small batches
NO_DATA = ["data_root=/nonexistent", "tasks.0.batch_size=8", "tasks.2.batch_size=8", "tasks.3.batch_size=4",
           "tasks.3.max_text_len=32"]


@pytest.fixture(scope="module")
def tiny():
    recipe = load_checked("toyworld-tiny", NO_DATA)
    return recipe, plan_recipe(recipe)


@pytest.mark.parametrize("index", [0, 2, 3], ids=["classification", "retrieval", "mlm"])
def test_traced_activations_match_a_real_step(tiny, index: int):
    recipe, plan = tiny
    measured = measure_step(recipe, index)
    planned = plan.tasks[index].activations
    assert within(planned, measured["activations"], TOLERANCE), (planned, measured)
    assert plan.tasks[index].backward >= measured["largest"]


def test_plan_names_the_largest_task_and_adds_up(tiny):
    _, plan = tiny
    assert plan.gpus == 1  # toyworld-tiny names no GPU count
    assert plan.largest.peak == max(task.peak for task in plan.tasks)
    assert plan.total == plan.states.total + plan.largest.peak + plan.runtime


def _recipe(kind: str, zero: int, precision: str = "bf16") -> object:
    return validate({"name": "x", "stage": "pretrain", "description": "on 8 GPUs",
                     "tasks": [{"name": "t", "type": "image_classification", "data": "d"}],
                     "train": {"precision": precision}, "engine": {"kind": kind, "zero_stage": zero}})


@pytest.mark.parametrize(("kind", "zero", "precision", "expected"), [
    ("single", 0, "bf16", (440, 440, 880)),  # fp32 weights, gradients, two moments
    ("deepspeed", 0, "bf16", (440, 440, 880)),
    ("deepspeed", 1, "bf16", (440, 440, 8 * 110 // 4 + 4 * 110 // 4)),  # moments + fp32 partition over 4
    ("deepspeed", 2, "bf16", (440, 4 * 110 // 4, 8 * 110 // 4 + 4 * 110 // 4)),  # gradients partitioned too
    ("deepspeed", 0, "fp16", (220, 220, 880 + 440)),  # fp16 weights and gradients, fp32 master beside the moments
])
def test_model_state_arithmetic(kind: str, zero: int, precision: str, expected: tuple[int, int, int]):
    model = torch.nn.Linear(10, 10)  # 110 parameters
    states = model_states(model, _recipe(kind, zero, precision), gpus=4)
    assert (states.weights, states.gradients, states.optimizer) == expected
    assert states.parameters == states.trainable == 110


def test_frozen_parameters_have_no_optimizer_state():
    model = torch.nn.Linear(10, 10)
    model.weight.requires_grad_(False)
    states = model_states(model, _recipe("single", 0), gpus=1)
    assert (states.weights, states.gradients, states.optimizer) == (440, 40, 80)


def test_gpu_count_comes_from_the_description():
    assert default_gpus(_recipe("deepspeed", 0)) == 8


def test_cli_exit_code_says_whether_it_fits():
    runner = CliRunner()
    fits = runner.invoke(app, ["plan", "toyworld-tiny", *NO_DATA])
    assert fits.exit_code == 0, fits.output
    assert "peak per process" in fits.output and "fits 80 GiB" in fits.output
    tight = runner.invoke(app, ["plan", "toyworld-tiny", *NO_DATA, "--gpu-memory", "0.5"])
    assert tight.exit_code == 2
    assert "does NOT fit 0.5 GiB" in tight.output


def test_a_vqa_step_is_traced_as_a_real_one():
    recipe = load_checked("toyworld-tiny-finetune-vqa", ["data_root=/nonexistent", "tasks.0.batch_size=8"])
    plan = plan_recipe(recipe)
    measured = measure_step(recipe, 0)
    assert within(plan.tasks[0].activations, measured["activations"], TOLERANCE), (plan.tasks[0], measured)
    assert plan.tasks[0].backward >= measured["largest"] and plan.tasks[0].target_rows == 1000  # assumed: no data
