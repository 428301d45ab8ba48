"""A prompt-tuned classifier (fc_prompt) scores labels by the names its rows were trained on."""

import pytest
import torch

import uniperceiver_cli as up

SIZE = 32
NAMES = ["circle", "square", "star", "heart", "cross"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = up.create_model("tiny", image_size=SIZE, layer_scale_init=1.0,
                          prompt={"classifier_classes": len(NAMES)}).eval()
    with torch.no_grad():  # a trained classifier: its logits decide, unlike the zero-initialised one
        net.head.fc_prompt.weight.normal_(0, 5.0)
        net.head.fc_prompt.bias.normal_(0, 1.0)
    net.class_names = list(NAMES)
    return net


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _one_line(error: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(error.value)
    return str(error.value)


def test_reordered_names_give_the_same_predictions(model, images):
    probs = model.classify(images, NAMES)
    order = [3, 0, 4, 1, 2]
    reordered = model.classify(images, [NAMES[i] for i in order])
    torch.testing.assert_close(reordered, probs[:, order])
    assert [NAMES[order[int(i)]] for i in reordered.argmax(1)] == [NAMES[int(i)] for i in probs.argmax(1)]
    assert len(set(probs.argmax(1).tolist())) > 1  # the classifier, not one constant answer, decides


def test_a_subset_scores_the_corresponding_columns(model, images):
    features = model.encode_text(NAMES)
    full = model.classification_logits(images, features, model.classifier_rows(NAMES))
    subset = ["STAR", "circle", "cross"]  # names match case-insensitively
    rows = model.classifier_rows(subset)
    assert rows.tolist() == [2, 0, 4]
    with torch.no_grad():
        logits = model.classification_logits(images, features[rows], rows)
    torch.testing.assert_close(logits, full[:, [2, 0, 4]])
    assert model.classify(images, subset).shape == (6, 3)


def test_a_name_without_logits_is_refused(model, images):
    with pytest.raises(ValueError) as error:
        model.classify(images, ["circle", "zebra"])
    assert "no logits for 'zebra'" in _one_line(error) and "5 classes" in str(error.value)
    with pytest.raises(ValueError, match="no logits for 'circle'"):
        model.classifier_rows(["circle", "circle"])  # one row per recorded name


def test_repeated_recorded_names_keep_their_rows_in_order(model):
    net = up.create_model(model.config)
    net.class_names = ["crane", "dog", "Crane", "cat", "fish"]  # ImageNet has two "crane" classes
    assert net.classifier_rows(net.class_names).tolist() == [0, 1, 2, 3, 4]
    assert net.classifier_rows(["crane", "cat", "crane"]).tolist() == [0, 3, 2]


def test_without_recorded_names_only_the_full_positional_list_works(model, images):
    net = up.create_model(model.config).eval()
    net.load_state_dict(model.state_dict())
    assert net.class_names is None and net.classifier_rows(NAMES) is None
    torch.testing.assert_close(net.classify(images, NAMES), model.classify(images, NAMES))
    with pytest.raises(ValueError) as error:
        net.classify(images, NAMES[:3])
    assert "records no class names" in _one_line(error) and "exactly those 5 labels" in str(error.value)
    with pytest.raises(ValueError) as error:  # features are scored by position: their count must match
        net.classify(images, net.encode_text(NAMES[:3]))
    assert "scores its 5 classes by position; got 3 targets" in _one_line(error)


def test_a_model_without_classifier_needs_no_names(images):
    net = up.create_model("tiny", image_size=SIZE).eval()
    assert net.classifier_rows(["anything"]) is None
    assert net.classify(images, ["a", "b"]).shape == (6, 2)
