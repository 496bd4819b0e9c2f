"""WA / UA / macro-F1 / confusion through the shipped evaluate module, offline."""

import pytest

from emotrain.metrics import compute_metrics


def test_metrics_on_a_known_confusion(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # true: 4 neutral, 2 happy, 2 sad, 0 angry
    references = [0, 0, 0, 0, 1, 1, 2, 2]
    predictions = [0, 0, 0, 1, 1, 3, 2, 0]
    m = compute_metrics(predictions, references)
    assert m["n"] == 8
    assert m["wa"] == pytest.approx(5 / 8)
    # recalls: neutral 3/4, happy 1/2, sad 1/2; angry absent from the references -> not averaged
    assert m["per_class_recall"] == {"neutral": 0.75, "happy": 0.5, "sad": 0.5, "angry": None}
    assert m["ua"] == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    assert m["confusion"] == [[3, 1, 0, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 0, 0, 0]]
    # F1: neutral p=3/4 r=3/4; happy p=1/2 r=1/2; sad p=1 r=1/2 -> 2/3; angry predicted once, never right -> 0
    assert m["macro_f1"] == pytest.approx((0.75 + 0.5 + 2 / 3 + 0.0) / 4)


def test_ua_differs_from_wa_on_imbalanced_data():
    references = [0] * 9 + [1]
    predictions = [0] * 10
    m = compute_metrics(predictions, references)
    assert m["wa"] == pytest.approx(0.9) and m["ua"] == pytest.approx(0.5)


def test_out_of_range_labels_are_an_error():
    with pytest.raises(ValueError, match="class indices"):
        compute_metrics([4], [0])
