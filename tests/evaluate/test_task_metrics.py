"""The GLUE metrics against scikit-learn on generated cases."""

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, matthews_corrcoef

from uniperceiver_cli.evaluate.metrics import binary_f1, matthews_correlation


def test_glue_metrics_against_scikit_learn():
    rng = np.random.default_rng(0)
    for classes in (2, 3):
        labels = rng.integers(0, classes, 200)
        predicted = np.where(rng.random(200) < 0.7, labels, rng.integers(0, classes, 200))
        assert matthews_correlation(torch.from_numpy(predicted), torch.from_numpy(labels)) == pytest.approx(
            100 * matthews_corrcoef(labels, predicted), abs=1e-9)
    assert binary_f1(torch.from_numpy(predicted), torch.from_numpy(labels)) == pytest.approx(
        100 * f1_score(labels == 1, predicted == 1), abs=1e-9)  # class 1 of the 3-class case
    assert matthews_correlation(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long)) == 0.0
