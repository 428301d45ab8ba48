"""The VQA accuracy of the official evaluation on hand-computed cases, and the GLUE metrics against scikit-learn on
generated cases."""

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, matthews_corrcoef

from uniperceiver_cli.data.vqa_answers import answer_scores, normalise_answer, vqa_accuracy
from uniperceiver_cli.evaluate.metrics import binary_f1, matthews_correlation


@pytest.mark.parametrize(("humans", "prediction", "expected"), [
    (["2"] * 10, "2", 1.0),
    (["2"] * 10, "3", 0.0),
    # 3 of 10 said "red": leaving one of those 3 out leaves 2 (2/3), leaving out another human leaves 3 (1)
    (["red"] * 3 + ["blue"] * 7, "red", (3 * 2 / 3 + 7 * 1) / 10),
    (["red"] * 2 + ["blue"] * 8, "red", (2 * 1 / 3 + 8 * 2 / 3) / 10),
    (["red"] * 1 + ["blue"] * 9, "red", (1 * 0 + 9 * 1 / 3) / 10),
    (["red"] * 4 + ["blue"] * 6, "red", 1.0),
    # the official normalisation of the prediction: articles, number words, case, punctuation, contractions
    (["2"] * 10, "Two", 1.0),
    (["dog"] * 10, "a dog.", 1.0),
    (["yes"] * 10, "Yes!", 1.0),
    (["don't know"] * 10, "dont know", 1.0),
    (["1000"] * 10, "1,000", 1.0),  # a comma within a number goes (VQA v2 stores answers normalised)
])
def test_vqa_accuracy_by_hand(humans, prediction, expected):
    assert vqa_accuracy(prediction, humans) == pytest.approx(expected)


def test_the_official_normalisation_and_soft_scores():
    assert normalise_answer("The Two dogs") == "2 dogs"
    assert normalise_answer("  left-hand side ") == "left hand side"
    assert normalise_answer("3.5") == "3.5" and normalise_answer("end.") == "end"
    # the accuracy takes the human answers as given (VQA v2's are normalised already): "Red!" is not "red"
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 6 + ["Red!"]) == pytest.approx(0.9)
    # the training scores normalise them as a prediction is: "Red!" and "Two" count as "red" and "2"
    assert answer_scores(["red"] * 3 + ["blue"] * 6 + ["Red!"]) == pytest.approx({"red": 1.0, "blue": 1.0})
    assert answer_scores(["Two"] * 2 + ["2"] + ["3"] * 7) == pytest.approx({"2": 0.9, "3": 1.0})
    assert answer_scores(["red"] + ["blue"] * 9) == pytest.approx({"red": 0.3, "blue": 1.0})
    assert answer_scores(["red", "red", "blue"] + ["green"] * 7) == pytest.approx({"red": 0.6, "blue": 0.3,
                                                                                   "green": 1.0})
    assert answer_scores(["a dog"]) == {"dog": 1.0} and vqa_accuracy("Dog.", ["dog"]) == 1.0  # one human
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy("red", [])


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
