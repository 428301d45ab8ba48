"""End to end through the CLI: prepare tiny ToyWorld, pretrain, prompt-tune, fine-tune, evaluate."""

import json

from typer.testing import CliRunner

from uniperceiver_cli.cli.app import app

runner = CliRunner()

SMALL = ["train.steps=3", "train.log_every=1", "train.warmup_steps=1", "model.overrides.image_size=32",
         "model.overrides.layers=2", "tasks.0.batch_size=8", "tasks.1.batch_size=4", "tasks.2.batch_size=8",
         "tasks.3.batch_size=4", "tasks.4.batch_size=4", "tasks.4.num_frames=4", "model.overrides.max_frames=4",
         "evaluation.tasks=[]"]


def _ok(args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + str(result.exception)
    return result


def test_prepare_pretrain_tune_evaluate(tmp_path):
    data = tmp_path / "toyworld"
    _ok(["prepare-data", "toyworld", "--out", data, "--size", "tiny", "--image-size", "32", "--num-frames", "4",
         "--min-shards", "2", "--no-progress"])
    base = tmp_path / "runs"
    _ok(["pretrain", "--recipe", "toyworld-tiny", "--run-dir", base / "pre", f"data_root={data}", *SMALL])
    final = base / "pre" / "final"
    assert (final / "model.safetensors").exists()
    _ok(["prompt-tune", "--recipe", "toyworld-tiny", "--run-dir", base / "prompt", "--init", final,
         f"data_root={data}", "stage=prompt-tune", "model.overrides.prompt={deep_prompt_length: 2}", *SMALL])
    _ok(["finetune", "--recipe", "toyworld-tiny", "--run-dir", base / "fine", "--init", final,
         f"data_root={data}", "stage=finetune", *SMALL])
    out = tmp_path / "eval"
    _ok(["evaluate", "--model", base / "fine" / "final", "--data", data / "images" / "test", "--task",
         "image_classification", "--label-set", "colour", "--out", out])
    results = json.loads((out / "results.json").read_text())
    assert results["num_samples"] > 0 and "acc@1" in results["metrics"]
    assert results["settings"]["labels"][:2] == ["red", "green"]
    _ok(["evaluate", "--model", base / "fine" / "final", "--data", data / "videos" / "test", "--task",
         "video_classification", "--label-set", "motion", "--views", "3", "--clips", "2", "--num-frames", "4",
         "--frame-stride", "3.75", "--out", tmp_path / "video"])  # the multi-view protocol: 3 crops x 2 clips
    video = json.loads((tmp_path / "video" / "results.json").read_text())
    assert video["num_samples"] == 12 and video["settings"]["clips"] == 2
    assert video["settings"]["frame_stride"] == 3.75

    # The tuning recipes of `make claims`, from the pre-trained model: video captioning and retrieval.
    tiny = ["train.steps=2", "train.warmup_steps=1", "model.overrides.image_size=32", "model.overrides.layers=2",
            "model.overrides.max_frames=4", "tasks.0.num_frames=4", "tasks.0.batch_size=4",
            "evaluation.tasks.0.num_frames=4", "evaluation.tasks.0.max_samples=4", f"data_root={data}"]
    for stage in ("prompt-tune", "finetune"):
        for kind, metric in (("caption", "BLEU-4"), ("retrieval", "i2t_R@1")):
            run = base / f"{stage}-{kind}"
            subset = ["tasks.0.subset=0.5"] if stage == "prompt-tune" else []  # 1% of 24 tiny clips is none
            _ok([stage, "--recipe", f"toyworld-tiny-{stage}-video-{kind}", "--run-dir", run, "--init", final,
                 *tiny, *subset])
            task = "video_captioning" if kind == "caption" else "video_text_retrieval"
            summary = json.loads((run / "eval" / "final" / "summary.json").read_text())
            assert metric in summary["results"][task], summary


def test_training_commands_refuse_mismatched_recipes(tmp_path):
    result = runner.invoke(app, ["finetune", "--recipe", "toyworld-tiny"])
    assert result.exit_code == 2 and "pretrain recipe" in result.stderr
    result = runner.invoke(app, ["pretrain", "--recipe", "toyworld-tiny", "train.steps=many"])
    assert result.exit_code == 2 and "train.steps" in result.stderr
    result = runner.invoke(app, ["pretrain", "--recipe", "no-such-recipe"])
    assert result.exit_code == 2 and "toyworld-tiny" in result.stderr
