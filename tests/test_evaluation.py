"""Test metrics agree with scikit-learn and behave at the edges a real test split reaches."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from retrain.errors import RetrainError
from retrain.evaluation import (
    LOSS_EPSILON,
    calibration_bins,
    confusion_matrix,
    cross_entropy,
    evaluate_predictions,
    expected_calibration_error,
    flatten_metrics,
)

LABELS = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


def random_predictions(num_images=200, num_classes=5, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(num_images, num_classes)) * 2
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return rng.integers(0, num_classes, num_images), probabilities


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed):
    y_true, probabilities = random_predictions(seed=seed)
    y_pred = probabilities.argmax(axis=1)
    classes = list(range(len(LABELS)))

    metrics = evaluate_predictions(y_true, probabilities, LABELS, top_k=[1, 2, 3])

    assert metrics["num_test_images"] == 200
    assert metrics["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    for k in [1, 2, 3]:
        expected = skm.top_k_accuracy_score(y_true, probabilities, k=k, labels=classes)
        assert metrics[f"top_{k}_accuracy"] == pytest.approx(expected)
    assert metrics["loss"] == pytest.approx(skm.log_loss(y_true, probabilities, labels=classes))
    for average in ["macro", "weighted"]:
        assert metrics[f"{average}_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average=average, labels=classes))
    assert metrics["macro_precision"] == pytest.approx(
        skm.precision_score(y_true, y_pred, average="macro", labels=classes)
    )
    assert metrics["macro_recall"] == pytest.approx(skm.recall_score(y_true, y_pred, average="macro", labels=classes))
    precision, recall, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=classes)
    for i, label in enumerate(LABELS):
        assert metrics["per_class"][label] == pytest.approx(
            {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": support[i]}
        )
    np.testing.assert_array_equal(
        confusion_matrix(y_true, y_pred, 5), skm.confusion_matrix(y_true, y_pred, labels=classes)
    )


def test_metrics_are_plain_json_for_dvc():
    y_true, probabilities = random_predictions()
    metrics = evaluate_predictions(y_true, probabilities, LABELS, top_k=[1])

    assert json.loads(json.dumps(metrics, allow_nan=False)) == metrics
    flat = flatten_metrics(metrics)
    assert flat["per_class/roses/f1"] == metrics["per_class"]["roses"]["f1"]
    assert flat["accuracy"] == metrics["accuracy"]
    assert all(not isinstance(value, dict) for value in flat.values())


def test_flattened_names_are_valid_mlflow_metric_names():
    labels = ["pink-yellow dahlia?", "colt's foot", "löwenzahn"]
    y_true, probabilities = random_predictions(num_classes=3)

    flat = flatten_metrics(evaluate_predictions(y_true, probabilities, labels, top_k=[1]))

    assert "per_class/pink-yellow dahlia_/f1" in flat
    assert "per_class/colt_s foot/recall" in flat
    assert "per_class/löwenzahn/support" in flat


def test_one_cross_entropy_from_logits_or_probabilities_even_at_extreme_logits():
    """The loss the search, fine-tuning, calibration and evaluate report: -mean log p(true class)."""
    y_true = np.array([0, 1, 2, 2])
    logits = np.array([[2.0, 1.0, 0.0], [0.5, 0.5, 0.5], [1000.0, -1000.0, 0.0], [-1e4, 0.0, 3e4]])
    # By hand: log-sums of exponentials, computed where they do not overflow.
    expected = np.mean(
        [
            np.log(1 + np.exp(-1) + np.exp(-2)),
            np.log(3),
            1000.0 + np.log(1 + np.exp(-1000.0)),
            0.0 + np.log1p(np.exp(-3e4)),
        ]
    )
    loss = cross_entropy(y_true, logits=logits)
    assert np.isfinite(loss) and loss == pytest.approx(expected, rel=1e-12)
    assert cross_entropy(y_true, logits=logits.astype(np.float32)) == pytest.approx(expected, rel=1e-7)
    # From probabilities: the same wherever p(true) >= LOSS_EPSILON, and a confident miss costs 16.1.
    mild = logits[:2]
    probabilities = np.exp(mild) / np.exp(mild).sum(axis=1, keepdims=True)
    assert cross_entropy(y_true[:2], probabilities=probabilities) == pytest.approx(
        cross_entropy(y_true[:2], logits=mild), abs=1e-12
    )
    assert cross_entropy([1], probabilities=np.array([[1.0, 0.0]])) == pytest.approx(-np.log(LOSS_EPSILON))
    assert np.isnan(cross_entropy([0], logits=np.array([[np.nan, 0.0]])))  # a diverged head: the search scores it +inf


def test_perfect_predictions():
    y_true = np.array([0, 1, 2, 3, 4] * 4)
    probabilities = np.full((20, 5), 0.0001)
    probabilities[np.arange(20), y_true] = 1 - 4 * 0.0001

    metrics = evaluate_predictions(y_true, probabilities, LABELS, top_k=[1, 5])

    assert metrics["accuracy"] == metrics["top_1_accuracy"] == metrics["top_5_accuracy"] == 1.0
    assert metrics["macro_f1"] == 1.0
    assert metrics["ece"] < 0.001
    assert metrics["loss"] < 0.001


def test_top_k_accuracy_grows_with_k_and_top_1_is_accuracy():
    y_true, probabilities = random_predictions(num_classes=5, seed=3)
    metrics = evaluate_predictions(y_true, probabilities, LABELS, top_k=[5, 1, 3, 2, 4])

    values = [metrics[f"top_{k}_accuracy"] for k in range(1, 6)]
    assert values == sorted(values)
    assert values[-1] == 1.0
    assert metrics["top_1_accuracy"] == metrics["accuracy"]


def test_top_1_agrees_with_accuracy_on_ties():
    # Uniform rows: argmax picks class 0, so only class-0 images count as right either way.
    probabilities = np.full((4, 5), 0.2)
    metrics = evaluate_predictions(np.array([0, 1, 2, 0]), probabilities, LABELS, top_k=[1, 2])

    assert metrics["accuracy"] == metrics["top_1_accuracy"] == 0.5
    assert metrics["top_2_accuracy"] == 0.75


def test_k_larger_than_classes_is_a_user_error():
    y_true, probabilities = random_predictions()
    with pytest.raises(RetrainError, match=r"evaluate.top_k: 6 .*\(5\)"):
        evaluate_predictions(y_true, probabilities, LABELS, top_k=[1, 6])


def test_empty_test_split_is_a_user_error():
    with pytest.raises(RetrainError, match="testing_percentage"):
        evaluate_predictions(np.zeros(0, int), np.zeros((0, 5)), LABELS, top_k=[1])


def test_class_never_predicted_or_absent_scores_zero_without_warnings():
    # Class 2 ("roses") is never predicted; class 4 ("tulips") never occurs and is never predicted.
    y_true = np.array([0, 1, 2, 2, 3])
    probabilities = np.eye(5)[[0, 1, 0, 1, 3]] * 0.9 + 0.02

    with np.errstate(all="raise"):
        metrics = evaluate_predictions(y_true, probabilities, LABELS, top_k=[1])

    zero = {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert metrics["per_class"]["roses"] == {**zero, "support": 2}
    assert metrics["per_class"]["tulips"] == {**zero, "support": 0}
    assert metrics["per_class"]["daisy"]["precision"] == 0.5
    assert metrics["macro_f1"] == pytest.approx(
        skm.f1_score(y_true, probabilities.argmax(1), average="macro", labels=range(5), zero_division=0)
    )


def test_calibration_bins_by_hand():
    # Confidences 0.9 (right), 0.9 (wrong), 0.5 (right): bins (13/15, 14/15] and (7/15, 8/15].
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.5, 0.5]])
    y_true = np.array([0, 1, 0])

    bins = calibration_bins(y_true, probabilities)

    assert bins.edges.shape == (16,) and bins.counts.sum() == 3
    assert bins.counts[13] == 2 and bins.counts[7] == 1
    assert bins.accuracy[13] == 0.5 and bins.confidence[13] == pytest.approx(0.9)
    assert np.isnan(bins.accuracy[0])
    expected_ece = (2 * abs(0.5 - 0.9) + 1 * abs(1.0 - 0.5)) / 3
    assert expected_calibration_error(bins) == pytest.approx(expected_ece)


def test_confidence_on_a_bin_edge_goes_to_the_lower_bin():
    bins = calibration_bins(np.array([0, 0]), np.array([[1.0, 0.0], [10 / 15, 5 / 15]]))

    assert bins.counts[14] == 1 and bins.counts[9] == 1
