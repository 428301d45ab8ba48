"""The statistics of `make claims` (benchmarks/claim_stats.py) against hand-computed cases, and each rule's
false-positive rate under the null by simulation: at or below its nominal level, where the old page's rule was not."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
spec = importlib.util.spec_from_file_location("claim_stats", BENCHMARKS / "claim_stats.py")
claim_stats = importlib.util.module_from_spec(spec)
sys.modules["claim_stats"] = claim_stats
spec.loader.exec_module(claim_stats)

TRIALS = 4000
# A rate estimated from TRIALS draws: at most the nominal level plus three standard errors.
SLACK = 3 * math.sqrt(0.05 * 0.95 / TRIALS)


def test_welch_by_hand():
    a, b = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]
    # t = (2 - 5) / sqrt(1/3 + 1/3) = -3.674, df = 4 (equal variances and sizes): p = 0.02131
    assert claim_stats.welch(a, b) == pytest.approx(0.021312, abs=1e-5)
    a, b = [10.0, 12.0, 14.0, 16.0], [11.0, 11.5]
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 2
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 1)  # Welch-Satterthwaite: 3.58
    from scipy.stats import t as student

    assert claim_stats.welch(a, b) == pytest.approx(2 * student.sf(abs(t), df), rel=1e-9)
    assert claim_stats.welch([2.0, 2.0], [2.0, 2.0]) == 1.0 and claim_stats.welch([2.0, 2.0], [3.0, 3.0]) == 0.0
    with pytest.raises(ValueError, match="at least 2 values per arm"):
        claim_stats.welch([1.0], [2.0, 3.0])


def test_the_exact_permutation_test_by_hand():
    # the 20 ways to split 1..6 into two arms of 3: the observed split is the most extreme of both directions
    assert claim_stats.permutation([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(2 / 20)
    assert claim_stats.permutation([1.0, 2.0], [3.0, 4.0]) == pytest.approx(2 / 6)  # 2 seeds an arm: never below 1/3
    assert claim_stats.permutation(range(5), range(5, 10)) == pytest.approx(2 / 252)
    # ties: every split at least as extreme as the observed one counts (here most of them)
    assert claim_stats.permutation([1.0, 1.0, 2.0], [1.0, 2.0, 2.0]) > 0.3


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> made monotone: 0.06 for the last
    assert claim_stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert claim_stats.holm([0.5, 0.9]) == [1.0, 1.0]
    assert claim_stats.holm([]) == []


def test_detectable_difference_and_verdicts():
    a, b = [0.0, 1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0, 5.0]  # sd 1.581, n 5 + 5, df 8
    expected = (2.306004 + 0.888889) * 1.581139 * math.sqrt(2 / 5)
    assert claim_stats.detectable_difference(a, b) == pytest.approx(expected, rel=1e-5)
    assert claim_stats.detectable_difference(a, b, tests=3) > expected  # a stricter level needs a larger difference
    assert claim_stats.verdict(1.2, 0.01, 0.9, expected_sign=1) == "agrees"
    assert claim_stats.verdict(-1.2, 0.01, 0.9, expected_sign=1) == "does not agree (significant)"
    assert claim_stats.verdict(0.3, 0.2, 0.9, expected_sign=1) == "not resolved at this power (detectable: 0.9)"


def test_share_interval():
    rng = np.random.default_rng(0)
    n = 2000
    zero, full = np.zeros(n), np.ones(n)
    tuned = (rng.random((3, n)) < 0.6).astype(float)  # 3 seeds recovering 60% of the gain
    estimate, low, high = claim_stats.share_interval(zero, tuned, full, resamples=500)
    assert estimate == pytest.approx(tuned.mean()) and low < 0.6 < high
    # The pooled mean's binomial standard error gives the width from test samples alone; resampling the seeds too
    # counts their sampling noise twice (each seed's mean holds it), so the interval is up to sqrt(2) wider:
    # conservative, never narrower.
    half = 1.96 * math.sqrt(0.24 / (3 * n))
    assert 2 * half * 0.95 <= high - low <= 2 * half * math.sqrt(2) * 1.15
    exact = claim_stats.share_interval(zero, np.full((2, n), 0.25), full, resamples=100)  # no spread at all
    assert exact == pytest.approx((0.25, 0.25, 0.25))
    with pytest.raises(ValueError, match="the same 2000 test samples"):
        claim_stats.share_interval(zero, tuned[:, :10], full)
    # fine-tuning gains nothing, or too little to tell from noise: no share, an unbounded interval
    nothing = claim_stats.share_interval(zero, tuned, zero[None], resamples=10)
    assert math.isnan(nothing[0]) and nothing[1:] == (-math.inf, math.inf)
    worse = claim_stats.share_interval(zero + 0.5, tuned, zero[None] + 0.4, resamples=10)  # fine-tuning loses
    assert worse[1:] == (-math.inf, math.inf)
    alternate = np.tile([0.0, 1.0], 20)
    slight = alternate.copy()
    slight[[0, 2, 1]] = (1.0, 1.0, 0.0)  # fine-tuning: 2 samples right more, 1 less, of 40
    estimate, *bounds = claim_stats.share_interval(alternate, np.tile(alternate, (3, 1)), slight[None])
    assert estimate == 0.0 and bounds == [-math.inf, math.inf]  # the resamples' gain is often not positive


def test_each_rule_keeps_its_false_positive_rate_under_the_null():
    """Both arms from one distribution: how often each rule calls a difference."""
    rng = np.random.default_rng(1)
    five = rng.normal(0.0, 1.0, (TRIALS, 2, 5))  # 5 seeds an arm
    welch = np.array([claim_stats.welch(a, b) for a, b in five]) < 0.05
    assert welch.mean() <= 0.05 + SLACK
    permutation = np.array([claim_stats.permutation(a, b) for a, b in five[:1000]]) < 0.05
    assert permutation.mean() <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 1000)
    # four metrics per trial, corrected together: the family-wise error
    family = rng.normal(0.0, 1.0, (TRIALS // 4, 4, 2, 5))
    rejected = [min(claim_stats.holm([claim_stats.welch(a, b) for a, b in metrics])) < 0.05 for metrics in family]
    assert np.mean(rejected) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / (TRIALS // 4))
    # the old page's rule, 2 seeds an arm: a difference of means above the larger half-range of the arms
    two = rng.normal(0.0, 1.0, (TRIALS, 2, 2))
    half_range = np.abs(two[:, :, 0] - two[:, :, 1]).max(axis=1) / 2
    old = np.abs(two[:, 0].mean(axis=1) - two[:, 1].mean(axis=1)) > half_range
    assert old.mean() > 0.4  # about 46%: it flags noise


def test_the_detectable_difference_has_its_power():
    """With the true difference the function names, the test rejects about 80% of the time."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(0.0, 1.0, 6), rng.normal(0.0, 1.0, 6)
    sd = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    shift = claim_stats.detectable_difference(a, b)
    draws = rng.normal(0.0, sd, (TRIALS, 2, 6))
    draws[:, 1] += shift
    power = np.mean([claim_stats.welch(x, y) < 0.05 for x, y in draws])
    assert 0.7 <= power <= 0.85  # the t approximation of Welch's test, near its 0.8


def test_gradient_cosines_by_hand():
    spec_ = importlib.util.spec_from_file_location("interference", BENCHMARKS / "interference.py")
    interference = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(interference)
    import torch

    model = torch.nn.Linear(2, 1, bias=False)
    x1, x2, x3 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([-2.0, 0.0])
    # the gradient of w . x with respect to w is x: cosines x1.x2 / (|x1| |x2|) = 1/sqrt(2), x1 against x3 -1
    grads = {name: interference.gradients(model, [lambda x=x: (model.weight @ x).sum()], ["weight"])
             for name, x in (("a", x1), ("b", x2), ("c", x3))}
    got = interference.cosines(grads)
    assert got == pytest.approx({("a", "b"): 1 / math.sqrt(2), ("a", "c"): -1.0, ("b", "c"): -1 / math.sqrt(2)})
    twice = interference.gradients(model, [lambda: (model.weight @ x1).sum()] * 2, ["weight"])
    assert twice.tolist() == [2.0, 0.0]  # summed over batches
    with pytest.raises(ValueError, match="no parameter bias"):
        interference.gradients(model, [], ["bias"])
    from uniperceiver_cli.model.config import get_config
    from uniperceiver_cli.model.uniperceiver import UniPerceiver

    names = interference.fc2_weights(UniPerceiver(get_config("tiny-moe", image_size=32)))
    assert names == [f"blocks.{i}.mlp.fc2.weight" for i in range(3)]


def test_per_sample_metrics_average_to_the_reported_ones(tmp_path):
    spec_ = importlib.util.spec_from_file_location("claims_page", BENCHMARKS / "claims.py")
    claims = importlib.util.module_from_spec(spec_)
    sys.modules["claims_page"] = claims  # its dataclasses look their module up
    spec_.loader.exec_module(claims)
    rows = [{"key": "a", "label": "red", "top": [{"label": "red", "prob": 0.9}]},
            {"key": "b", "label": "blue", "top": [{"label": "red", "prob": 0.6}]}]
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert claims.per_sample(tmp_path / "cls.jsonl", "acc@1") == {"a": 100.0, "b": 0.0}
    rows = [{"key": "a", "best_text": "x", "correct": True}, {"key": "b", "best_text": "y", "correct": False}]
    (tmp_path / "ret.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert claims.per_sample(tmp_path / "ret.jsonl", "i2t_R@1") == {"a": 100.0, "b": 0.0}
    from uniperceiver_cli.evaluate.metrics import caption_metrics

    refs = {"a": ["a red circle on the left", "there is a red circle"], "b": ["a blue star at the top", "a star"],
            "c": ["a green square", "the square is green"]}
    captions = {"a": "a red circle on the left", "b": "a blue square", "c": "a green square"}
    rows = [{"key": k, "caption": captions[k], "references": refs[k]} for k in refs]
    (tmp_path / "cap.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cider = claims.per_sample(tmp_path / "cap.jsonl", "CIDEr")
    assert set(cider) == set(refs) and cider["a"] > cider["b"]
    assert np.mean(list(cider.values())) == pytest.approx(caption_metrics(captions, refs)["CIDEr"], rel=1e-9)
    with pytest.raises(ValueError, match="no per-sample form of BLEU-4"):
        claims.per_sample(tmp_path / "cap.jsonl", "BLEU-4")
