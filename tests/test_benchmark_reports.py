"""The reports of `make demo` (benchmarks/demo_targets.py) and `make claims` (benchmarks/claims.py) on made-up
runs: the rows, the targets met and missed, the true-caption R@1, the claims' arithmetic and commands."""

import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from uniperceiver_cli.data import loader
from uniperceiver_cli.data.shards import read_metas
from uniperceiver_cli.data.toyworld import generate

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


demo_targets = _load("demo_targets")
_load("claim_stats"), _load("interference")  # what claims.py imports from beside it
claims = _load("claims")


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


def test_claims_share_verdicts() -> None:
    assert claims.share_verdict((0.8, 0.7, 0.9), paper=0.8) == "agrees"
    assert claims.share_verdict((0.3, 0.2, 0.4), paper=0.8) == "does not agree (significant): recovers less"
    assert claims.share_verdict((0.5, 0.3, 0.6), paper=0.09) == "does not agree (significant): recovers more"
    assert claims.share_verdict((0.5, -0.4, 0.9), paper=0.8) == "not resolved at this power (interval -40% to 90%)"
    # wide but wholly on one side: still significant; fitted to nothing while recovering less: the scale's evidence
    assert claims.share_verdict((-4.8, -17.4, -1.8), paper=0.09) == "does not agree (significant): recovers less"
    assert (claims.share_verdict((-4.8, -17.4, -1.8), paper=0.09, memorized="fits 21 clips")
            == "not reproduced at this scale: fits 21 clips")
    assert claims.share_verdict((0.5, 0.3, 0.6), paper=0.09, memorized="fits 21 clips").startswith("does not agree")


def test_claims_final_loss_and_subset_size(tmp_path: Path, world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "motion_classification/loss": 1.5}\n{"step": 20, "lr": 0.1}\n'
                                            '{"step": 30, "motion_classification/loss": 0.25, "grad_norm": 2.0}\n')
    assert claims.final_loss(tmp_path, "motion_classification") == 0.25
    assert claims.final_loss(tmp_path, "video_captioning") is None
    assert claims.final_loss(tmp_path / "missing", "motion_classification") is None
    monkeypatch.setattr(claims, "DATA", world)
    motion, caption = (next(t for t in claims.TUNED if t.name == name) for name in ("motion", "video-caption"))
    labels = json.loads((world / "videos" / "train" / "manifest.json").read_text())["classes"]
    assert claims.subset_size(motion) == f"{len(labels)} clips"  # int(0.01 n_c) + 1 = 1 clip of each motion
    assert claims.subset_size(caption) == "none (a 0.01 subset of 24 samples is empty)"
    recipe = claims._recipe("toyworld-tiny-prompt-tune-video-caption")
    half = dataclasses.replace(recipe, tasks=[dataclasses.replace(recipe.tasks[0], subset=0.5)])
    monkeypatch.setattr(claims, "_recipe", lambda name: half)
    shards = sorted((world / "videos" / "train").glob("*.tar"))
    pairs = sum(sum(loader._caption_counts(str(url)).values()) for url in shards)
    found = re.fullmatch(r"(\d+) pairs over (\d+) clips", claims.subset_size(caption))
    assert found and int(found[1]) == pairs // 2 and pairs // 2 / 4 <= int(found[2]) <= 24  # 2 to 4 captions a clip


def test_claims_plan_searches_then_runs_the_seeds(tmp_path: Path) -> None:
    search = claims.plan(tmp_path, scale=0.01, limit=8)
    keys = [job.key for job in search.jobs]
    assert keys[:2] == ["demo", "zero-shot-video-caption"] and len(keys) == 2 + 4 * 4  # 4 tasks x 2 methods x 2 rates
    jobs = {job.key: job for job in search.jobs}
    zero = jobs["zero-shot-video-caption"].argv  # the demo's captions again, over the tokens the tuned runs decode over
    assert zero[:3] == ["evaluate", "--model", str(tmp_path / "demo")]
    assert [zero[i + 1] for i, a in enumerate(zero) if a == "--vocabulary-from"] == [
        str(claims.DATA / folder) for folder in ("images/train", "text/train", "videos/train")]
    pt = jobs["search-prompt-tune-video-caption-0.003"].recipe
    ft = jobs["search-finetune-video-caption-0.0001"].recipe
    for recipe in (pt, ft):  # compute-matched: the same steps, batch, warm-up and clipping
        assert (recipe["train"]["steps"], recipe["tasks"][0]["batch_size"], recipe["train"]["warmup_steps"],
                recipe["train"]["grad_clip"]) == (10, 16, 30, 0.1)
        assert recipe["evaluation"]["tasks"][0]["data"] == "videos/val"  # chosen on validation, not test
    assert pt["train"]["lr"] == 0.003 and pt["tasks"][0]["subset"] == 0.01 and ft["tasks"][0].get("subset") is None
    with pytest.raises(SystemExit, match="search of prompt-tune image-caption has not finished"):
        claims.choose_rates(search)
    chosen = {f"{kind}-{t.name}": rates[1] for t in claims.TUNED for kind, rates in claims.LEARNING_RATES.items()}
    full = {job.key: job for job in claims.plan(tmp_path, scale=0.01, limit=8, chosen=chosen).jobs}
    deep = full["deep-prompt-motion-seed2"].recipe
    assert deep["model"]["overrides"]["prompt"]["deep_prompt_length"] == 40 and deep["train"]["seed"] == 2
    assert deep["train"]["lr"] == 0.003 and full["finetune-motion-seed2"].recipe["train"]["lr"] == 0.0003
    assert [f"moe-seed{s}" in full and f"dense-seed{s}" in full for s in range(5)] == [True] * 5
    assert full["routing-context-seed2"].recipe["model"]["overrides"]["moe"] == {"routing": "context"}
    borrowed = full["routing-task-seed1-video_captioning"].argv
    assert borrowed[borrowed.index("--routing-task") + 1] == "image_captioning"
    assert not any(job.finished() for job in full.values())  # nothing has run in tmp_path


def _fake(run: Path, results: dict, errors: dict | None = None, predictions: dict | None = None) -> None:
    """A finished run as the report reads it: its summary and per-sample predictions."""
    final = run / "eval" / "final"
    final.mkdir(parents=True)
    summary = {"step": 3, "results": results, **({"errors": errors} if errors else {})}
    (final / "summary.json").write_text(json.dumps(summary))
    for task, rows in (predictions or {}).items():
        (final / task).mkdir()
        (final / task / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_claims_page_from_made_up_runs(tmp_path: Path, world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims, "DATA", world)
    runs = tmp_path / "runs"
    chosen = {f"{kind}-{t.name}": rates[0] for t in claims.TUNED for kind, rates in claims.LEARNING_RATES.items()}
    plan = claims.plan(runs, scale=0.01, limit=8, chosen=chosen)
    keys = [f"c{i}" for i in range(10)]

    def motion(correct: int) -> list[dict]:  # the first `correct` of 10 clips right
        return [{"key": k, "label": "growing", "top": [{"label": "growing" if i < correct else "rotating"}]}
                for i, k in enumerate(keys)]

    seeds = {"dense": [50.0, 51.0, 49.0, 50.5, 49.5], "moe": [55.0, 56.0, 54.0, 55.5, 54.5]}  # MLM: +5, sd 0.8
    for job in plan.jobs:
        if job.argv[0] == "evaluate":
            job.folder.mkdir(parents=True)
            (job.folder / "results.json").write_text(json.dumps({"metrics": {"acc@1": 33.0, "CIDEr": 4.0,
                                                                             "i2t_R@1": 7.0}}))
            continue
        results = {task: {metric: 50.0} for task, metric, *_ in claims.TASKS}
        correct = {"demo": 0, "finetune": 10, "prompt-tune": 6, "deep-prompt": 8}.get(job.key.split("-motion")[0])
        if correct is not None and ("motion" in job.key or job.key == "demo"):
            results["motion_classification"]["acc@1"] = 10.0 * correct
        arm, _, seed = job.key.rpartition("-seed")
        if arm in seeds:
            results["mlm"]["masked_acc"] = seeds[arm][int(seed)]
        if job.key.startswith("routing-attribute"):
            results["shape_classification"]["acc@1"] = 60.0 + int(seed)  # trained mean (60+s + 4 x 50) / 5
        errors = None
        if job.key.startswith("routing-task-seed"):
            errors = {task: f"task routing cannot serve task {task!r}" for task in claims.BORROWED}
            results = {task: m for task, m in results.items() if task not in claims.BORROWED}
        _fake(job.folder, results, errors,
              {"motion_classification": motion(correct)} if correct is not None and "motion" in job.key
              or job.key == "demo" else None)
    (runs / "times.json").write_text(json.dumps({job.key: 60.0 for job in plan.jobs}))

    page = claims.report(plan, tmp_path / "docs" / "claims.md", chosen)
    assert (tmp_path / "docs" / "claims.md").read_text() == page
    # motion: zero-shot 0, fine-tuned 100, prompt-tuned 60 on every seed: a share of 60% whose interval over 10
    # clips (resampled) lies above Kinetics' 9%
    row = next(line for line in page.splitlines() if line.startswith("| motion classification"))
    assert row == ("| motion classification (seen), acc@1 | 0.0 | 60.0 ± 0.0 (3) | 80.0 ± 0.0 (3) | 100.0 ± 0.0 (3) | "
                   "60% [30, 90] | 80% [50, 100] | 7 clips; prompt-tune -, finetune - | "
                   "K400 acc@1: 74.5 / 74.8 / 77.7, 9% | does not agree (significant): recovers more |")
    # video captioning's zero-shot: the zero-shot evaluation's (4.0), not the demo's own; no predictions: no share
    assert "| video captioning (unseen), CIDEr | 4.0 | 50.0 ± 0.0 (3) | 50.0 ± 0.0 (3) | 50.0 ± 0.0 (3) | - | - |" \
        in page
    # MLM, MoE 5 points better over 5 seeds of sd 0.8: significant after Holm over the 5 primary metrics
    row = next(line for line in page.splitlines() if line.startswith("| MLM masked acc |"))
    assert "| 50.0 ± 0.8 (5) | 55.0 ± 0.8 (5) | +5.00 |" in row and row.endswith("| - | agrees |")
    assert "| 0.008 |" in row  # the exact permutation test: the arms wholly apart, 2 of C(10, 5) = 252 splits
    row = next(line for line in page.splitlines() if line.startswith("| colour acc@1 (zero-shot) |"))
    assert "not resolved at this power" in row
    assert "| shape acc@1 | 50.0 ± 0.0 (5) | 50.0 ± 0.0 (5) | +0.00 | 1.000 |" in page  # secondary
    # routing: attribute's trained mean (61 + 4 x 50) / 5 = 52.2 +- 0.2 against 50 for every other level
    row = next(line for line in page.splitlines() if line.startswith("| trained tasks | token |"))
    assert "| 52.2 ± 0.2 (3) | 50.0 ± 0.0 (3) | +2.20 |" in row and row.endswith("| agrees |")
    assert "| zero-shot tasks | task |" in page  # task routing's borrowed experts give its zero-shot mean
    assert "Wall time of the runs below:" in page
