"""The reports of `make demo` (benchmarks/demo_targets.py) and `make claims` (benchmarks/claims.py) on made-up
runs: the rows, the targets met and missed, the true-caption R@1, the claims' arithmetic and commands."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from uniperceiver_cli.data.shards import read_metas
from uniperceiver_cli.data.toyworld import generate

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


demo_targets, claims = _load("demo_targets"), _load("claims")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toyworld")
    generate(out, size="tiny", image_size=32, num_frames=4, min_shards=2, progress=False)
    return out


def _run(tmp_path: Path, world: Path, results: dict, best: dict[str, str]) -> Path:
    run = tmp_path / "run"
    final = run / "eval" / "final"
    (final / "image_text_retrieval").mkdir(parents=True)
    tasks = [{"name": "image_text_retrieval", "type": "image_retrieval", "data": "images/test", "captions_per_item": 1}]
    (run / "config.yaml").write_text(yaml.safe_dump({"data_root": str(world), "evaluation": {"tasks": tasks}}))
    (final / "summary.json").write_text(json.dumps({"step": 1, "results": results}))
    (final / "image_text_retrieval" / "predictions.jsonl").write_text(
        "".join(json.dumps({"key": k, "best_text": t}) + "\n" for k, t in best.items()))
    return run


def test_demo_rows_mark_targets_and_count_true_captions(tmp_path: Path, world: Path) -> None:
    metas = read_metas(world / "images" / "test")
    keys = sorted(metas)
    # The first half's top caption is its own (true); the second half's is the next image's, whose main shape
    # differs (shapes cycle with the index), so it is false of it.
    best = {k: metas[k if i < len(keys) // 2 else keys[(i + 1) % len(keys)]]["captions"][0]
            for i, k in enumerate(keys)}
    results = {"shape_classification": {"acc@1": 85.0}, "image_text_retrieval": {"i2t_R@1": 14.9},
               "motion_classification": {"acc@1": 70.5}}
    rows = {(task, metric): row for task, metric, *row in demo_targets.rows(_run(tmp_path, world, results, best))}
    assert rows["shape_classification", "acc@1"] == [85.0, 85.0, None, "12.5", "yes"]  # the target itself is met
    value, target, ceiling, _, met = rows["image_text_retrieval", "i2t_R@1"]
    assert (value, target, met) == (14.9, 15.0, "NO") and 0 < ceiling <= 100
    assert rows["image_text_retrieval", "i2t_R@1, true caption"][0] == 50.0
    assert rows["image_captioning", "BLEU-4"][0] is None and rows["image_captioning", "BLEU-4"][-1] == "NO"
    assert rows["video_captioning", "BLEU-4"][-1] == "reported"  # no target: reported only
    assert ("video_text_retrieval", "i2t_R@1, true caption") not in rows  # not evaluated: no truth row


def test_claims_arithmetic() -> None:
    assert claims.recovered(22.6, 59.5, 63.3) == pytest.approx(90.66, abs=0.01)  # the paper's MSVD captioning
    assert claims.recovered(10.0, 10.0, 10.0) is None and claims.recovered(None, 1.0, 2.0) is None
    assert claims.spread([80.0, 84.0]) == 2.0
    assert claims.verdict(1.0, 2.0, 1.1) == "within the seeds' spread: not resolved"
    assert claims.verdict(3.0, 2.0, 1.1) == "MoE better: agrees"
    assert claims.verdict(-3.0, 2.0, 0.8) == "MoE worse: **contradicts the paper**"
    assert claims.verdict(-3.0, 2.0, -0.3) == "MoE worse; the paper: about equal"
    assert claims.verdict(-3.0, 2.0, None) == "MoE worse"


def test_claims_plan_runs_valid_commands_in_order(tmp_path: Path) -> None:
    plan = claims.plan(tmp_path, scale=0.01, limit=8)
    keys = [job.key for job in plan.jobs]
    assert keys[:6] == ["demo", "zero-shot-video-caption", "prompt-tune-video-caption", "prompt-tune-video-retrieval",
                        "finetune-video-caption", "finetune-video-retrieval"]
    assert keys[6:8] == ["prompt-tune-all-video-caption", "prompt-tune-all-video-retrieval"]
    assert keys[8:11] == ["dense-seed1", "moe-seed0", "moe-seed1"]
    assert keys[11:17] == ["routing-dense", "routing-token", "routing-context", "routing-modality", "routing-task",
                          "routing-task-colour_classification"]
    jobs = {job.key: job for job in plan.jobs}
    assert jobs["moe-seed1"].recipe["train"]["seed"] == 1 and jobs["moe-seed1"].recipe["train"]["steps"] == 62
    assert jobs["routing-token"].recipe["model"]["overrides"]["moe"] == {"routing": "token"}
    assert jobs["prompt-tune-video-caption"].recipe["init"] == str(tmp_path / "demo")
    assert jobs["prompt-tune-video-caption"].needs == tmp_path / "demo"
    assert jobs["prompt-tune-video-caption"].recipe["tasks"][0]["subset"] == 0.01
    assert jobs["prompt-tune-all-video-caption"].recipe["tasks"][0]["subset"] is None
    borrowed = jobs["routing-task-video_captioning"].argv
    assert borrowed[:3] == ["evaluate", "--model", str(tmp_path / "routing-task")]
    for option, value in (("--routing-task", "image_captioning"), ("--frame-stride", "3.75"), ("--limit", "8")):
        assert borrowed[borrowed.index(option) + 1] == value
    assert not any(job.finished() for job in plan.jobs)  # nothing has run in tmp_path


def _fake(run: Path, results: dict, errors: dict | None = None, predictions: dict | None = None) -> None:
    """A finished run as the report reads it: its summary, training losses and retrieval predictions."""
    final = run / "eval" / "final"
    final.mkdir(parents=True)
    summary = {"step": 3, "results": results, **({"errors": errors} if errors else {})}
    (final / "summary.json").write_text(json.dumps(summary))
    losses = [{"step": s, **{f"{t}/loss": 3.0 - s / 100 for t in claims.TRAINED}} for s in (50, 100, 150)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in losses))
    for task, best in (predictions or {}).items():
        (final / task).mkdir()
        (final / task / "predictions.jsonl").write_text(
            "".join(json.dumps({"key": k, "best_text": t}) + "\n" for k, t in best.items()))


def test_claims_page_from_made_up_runs(tmp_path: Path, world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims, "DATA", world)
    runs = tmp_path / "runs"
    plan = claims.plan(runs, scale=0.01, limit=8)
    own = {split: {k: m["captions"][0] for k, m in read_metas(world / split / "test").items()}
           for split in ("images", "videos")}
    predictions = {"image_text_retrieval": own["images"], "video_text_retrieval": own["videos"]}
    shape = {"demo": 80.0, "dense-seed1": 82.0, "moe-seed0": 86.0, "moe-seed1": 88.0, "routing-attribute": 90.0}
    tuning = {"demo": 10.0, "prompt-tune-video-retrieval": 19.0, "finetune-video-retrieval": 20.0,
              "prompt-tune-video-caption": 40.0, "finetune-video-caption": 44.0, "prompt-tune-all-video-caption": 42.0,
              "prompt-tune-all-video-retrieval": 21.0}
    for job in plan.jobs:
        if job.argv[0] == "evaluate":  # zero-shot captions over the tuned tokens; task routing's borrowed experts
            job.folder.mkdir(parents=True)
            (job.folder / "results.json").write_text(json.dumps({"metrics": {"BLEU-4": 4.0, "acc@1": 33.0,
                                                                             "i2t_R@1": 7.0}}))
            continue
        results = {task: {metric: 50.0} for task, metric, *_ in claims.TASKS}
        results["shape_classification"]["acc@1"] = shape.get(job.key, 50.0)
        results["video_captioning"]["BLEU-4"] = tuning.get(job.key, 5.0)
        results["video_text_retrieval"] |= {"i2t_R@1": tuning.get(job.key, 50.0), "t2i_R@1": 5.0}
        errors = None
        if job.key == "routing-task":
            errors = {task: f"task routing cannot serve task {task!r}" for task in claims.BORROWED}
            results = {task: m for task, m in results.items() if task not in claims.BORROWED}
        _fake(job.folder, results, errors, predictions)
    (runs / "times.json").write_text(json.dumps({job.key: 60.0 for job in plan.jobs}))

    page = claims.report(plan, tmp_path / "docs" / "claims.md")
    assert (tmp_path / "docs" / "claims.md").read_text() == page
    # zero-shot 4 (over the tuned tokens), prompt-tuned 40, fine-tuned 44: 36 of 40 points recovered
    assert "| video captioning BLEU-4 | 4.0 | 40.0 | 42.0 | 44.0 | 90% | 95% |" in page
    assert "| video-text v2t R@1 | 10.0 | 19.0 | 21.0 | 20.0 | 90% | 110% |" in page
    assert "| video-text v2t R@1, true caption | 100.0 | 100.0 | 100.0 | 100.0 | - | - | - |" in page  # own: true
    assert "video captioning BLEU-4: prompt tuning on 1% recovers 90% of fine-tuning's gain, the goal" in page
    assert "video-text t2v R@1: fine-tuning gained nothing over zero-shot" in page  # 5.0 everywhere
    assert "| shape acc@1 | 81.0 ± 1.0 (80.0, 82.0) | 87.0 ± 1.0 (86.0, 88.0) | +6.0 |" in page
    assert "MoE better: agrees" in page
    assert "refused; 33.0 with shape_classification's experts" in page
    # trained-task means: attribute (90 + 4 x 50) / 5 = 58 against 50; the seeds' range of such a mean: 0.4
    assert "On the trained tasks (attribute 58.0, token 50.0" in page
    assert "attribute leads token by 8.0, more than the seeds' range (0.4): agrees with the paper." in page
    assert "attribute ties token (0.00 apart)" in page  # zero-shot means: (50 + 5 + 50) / 3 for both
    assert "task routing cannot serve task 'colour_classification'" in page
    assert "Wall time of the runs below: 20 minutes" in page  # 20 runs of 60 s
    for name in ("tuning", "curves-moe", "curves-routing"):
        assert (tmp_path / "docs" / "claims" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
