"""Test-set metrics from predicted probabilities: pure numpy, no TensorFlow.

The evaluate stage feeds the head's softmax output on the test split to `evaluate_predictions`
and writes the result as the `dvc metrics` file; `retrain.reports` draws the same numbers for a
person. Conventions match scikit-learn (checked in the tests): class indices are `0..C-1` in
label order, a confusion matrix has true classes as rows, and a ratio whose denominator is zero
(precision of a class never predicted, recall of a class absent from the test split) is 0.
"""

import re
from typing import NamedTuple

import numpy as np

from retrain.errors import RetrainError

CALIBRATION_BINS = 15  # Guo et al. 2017, "On Calibration of Modern Neural Networks"
LOSS_EPSILON = 1e-7  # Keras' clip of probabilities: a confident wrong answer costs 16.1, not infinity
_UNSAFE_NAME_CHARACTERS = re.compile(r"[^\w./\- :]")  # MLflow's rule for metric names


class CalibrationBins(NamedTuple):
    """Equal-width bins over confidence (the max probability), for the reliability diagram.

    edges: float64 [B+1] from 0 to 1; bin i holds confidences in (edges[i], edges[i+1]].
    counts: int64 [B]. confidence, accuracy: float64 [B], mean confidence and fraction correct
    of the images in each bin; NaN where a bin is empty.
    """

    edges: np.ndarray
    counts: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray


def confusion_matrix(y_true, y_pred, num_classes):
    """int64 [C, C] counts: row = true class, column = predicted class.

    y_true, y_pred: int arrays [N] with values in 0..num_classes-1.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def precision_recall_f1(confusion):
    """Per-class (precision, recall, f1, support) from a confusion matrix, each [C].

    precision, recall, f1 are float64 and 0 where undefined; support is int64, true images per
    class.
    """
    confusion = np.asarray(confusion)
    true_positives = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    precision = _safe_divide(true_positives, predicted)
    recall = _safe_divide(true_positives, support)
    # 2TP / (2TP + FP + FN), as sklearn does: defined even when precision + recall is 0.
    f1 = _safe_divide(2 * true_positives, predicted + support)
    return precision, recall, f1, support.astype(np.int64)


def cross_entropy(y_true, *, logits=None, probabilities=None) -> float:
    """Mean cross-entropy in nats, -log p(true class), of a softmax head: every loss that judges a head.

    Plain: no label smoothing, no L2 penalty, no class weights (training's loss adds them; see
    docs/tracking.md). y_true: int [N], N > 0. Give one of: logits float [N, C], through a stable
    log-softmax in float64, exact for any finite logits; or probabilities float [N, C] (a model that
    gives only those), each floored at LOSS_EPSILON, so one image costs at most 16.1. The two agree
    wherever p(true class) >= LOSS_EPSILON. Non-finite logits (a diverged head) give nan or inf.
    """
    if (logits is None) == (probabilities is None):
        raise TypeError("cross_entropy takes logits or probabilities, one of them")
    rows = (np.arange(len(y_true)), np.asarray(y_true, dtype=np.int64))
    if probabilities is not None:
        return float(-np.mean(np.log(np.clip(np.asarray(probabilities)[rows], LOSS_EPSILON, 1.0))))
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: a diverged head, reported as nan
        shifted = np.asarray(logits, dtype=np.float64)
        shifted = shifted - shifted.max(axis=1, keepdims=True)
        log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probabilities[rows].mean())


def top_k_hits(y_true, probabilities, k):
    """bool [N]: whether the true class is among the k most probable.

    Ties rank the lower class index first, as np.argmax does, so k=1 agrees with accuracy.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    rows = np.arange(len(y_true))
    p_true = probabilities[rows, y_true][:, None]
    classes = np.arange(probabilities.shape[1])
    above = (probabilities > p_true) | ((probabilities == p_true) & (classes < y_true[:, None]))
    return above.sum(axis=1) < k


def calibration_bins(y_true, probabilities, num_bins=CALIBRATION_BINS):
    """Bin test images by confidence; see `CalibrationBins`.

    y_true: int [N]; probabilities: float [N, C], rows summing to 1.
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    # side="left" puts a confidence equal to an edge in the bin below it: (lower, upper].
    index = np.searchsorted(edges[1:-1], confidence, side="left")
    counts = np.bincount(index, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, minlength=num_bins) / counts
        accuracy = np.bincount(index, correct, minlength=num_bins) / counts
    return CalibrationBins(edges, counts.astype(np.int64), mean_confidence, accuracy)


def expected_calibration_error(bins):
    """Mean |accuracy - confidence| over bins, weighted by images per bin (0 = calibrated)."""
    filled = bins.counts > 0
    gaps = np.abs(bins.accuracy[filled] - bins.confidence[filled])
    return float(np.sum(gaps * bins.counts[filled]) / bins.counts.sum())


def evaluate_predictions(y_true, probabilities, labels, top_k):
    """All test metrics as one JSON-serialisable dict for `dvc metrics` and MLflow.

    y_true: int [N], class indices into `labels`. probabilities: float [N, C], softmax output.
    labels: C class names. top_k: the k values for `top_{k}_accuracy`; each must be at most C.

    Returns scalars at the top level and the per-class numbers nested under "per_class":
        {"num_test_images": N, "accuracy": ..., "top_1_accuracy": ..., "loss": ...,
         "macro_precision": ..., "macro_recall": ..., "macro_f1": ..., "weighted_f1": ...,
         "ece": ...,
         "per_class": {label: {"precision": ..., "recall": ..., "f1": ..., "support": n}}}
    `dvc metrics show` flattens the nesting to columns like `per_class.daisy.f1`; use
    `flatten_metrics` for stores that want flat names (MLflow). Macro averages weigh every
    class in `labels` equally, including any absent from the test split (sklearn's
    `labels=range(C)`). `loss` is `cross_entropy` of the probabilities: plain, without training's
    label smoothing or L2 penalty.
    """
    y_true, probabilities = _check_inputs(y_true, probabilities, labels, top_k)
    y_pred = probabilities.argmax(axis=1)
    precision, recall, f1, support = precision_recall_f1(confusion_matrix(y_true, y_pred, len(labels)))
    metrics = {
        "num_test_images": int(len(y_true)),
        "accuracy": float(np.mean(y_pred == y_true)),
    }
    for k in sorted(set(top_k)):
        metrics[f"top_{k}_accuracy"] = float(np.mean(top_k_hits(y_true, probabilities, k)))
    metrics.update(
        loss=cross_entropy(y_true, probabilities=probabilities),
        macro_precision=float(precision.mean()),
        macro_recall=float(recall.mean()),
        macro_f1=float(f1.mean()),
        weighted_f1=float(np.average(f1, weights=support)),
        ece=expected_calibration_error(calibration_bins(y_true, probabilities)),
    )
    metrics["per_class"] = {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    return metrics


def flatten_metrics(metrics, sep="/"):
    """{"per_class": {"daisy": {"f1": 0.9}}} → {"per_class/daisy/f1": 0.9}, for MLflow.

    Characters MLflow refuses in a metric name (Oxford 102 has "pink-yellow dahlia?" and
    "colt's foot") become "_"; scalars at the top level keep their names.
    """
    flat = {}
    for key, value in metrics.items():
        key = _UNSAFE_NAME_CHARACTERS.sub("_", str(key))
        if isinstance(value, dict):
            for inner_key, inner_value in flatten_metrics(value, sep).items():
                flat[f"{key}{sep}{inner_key}"] = inner_value
        else:
            flat[key] = value
    return flat


def mlflow_metrics(metrics: dict) -> dict[str, float]:
    """metrics.json → chart groups: test/accuracy, test/top_2_accuracy, …, test_per_class/<class>_f1.

    The UI groups charts by the name up to its last "/", so per-class numbers share one group.
    """
    flat = {}
    for key, value in flatten_metrics(metrics, sep="/").items():
        if key.startswith("per_class/"):
            _, label, name = key.split("/", 2)
            flat[f"test_per_class/{label}_{name}"] = float(value)
        elif key != "num_test_images":
            flat[f"test/{key}"] = float(value)
    return flat


def _check_inputs(y_true, probabilities, labels, top_k):
    """Arrays as int64 [N] and float64 [N, C]; mismatched shapes are bugs, bad params are not."""
    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    num_classes = len(labels)
    if probabilities.ndim != 2 or probabilities.shape[1] != num_classes:
        raise ValueError(f"probabilities has shape {probabilities.shape}, expected [N, {num_classes}]")
    if y_true.shape != (probabilities.shape[0],) or not np.issubdtype(y_true.dtype, np.integer):
        raise ValueError(f"y_true must be int [{probabilities.shape[0]}], got {y_true.dtype} {y_true.shape}")
    if len(set(labels)) != num_classes:
        raise ValueError(f"labels are not unique: {labels}")
    if y_true.size and (y_true.min() < 0 or y_true.max() >= num_classes):
        raise ValueError(f"y_true has class indices outside 0..{num_classes - 1}")
    if len(y_true) == 0:
        raise RetrainError("the test split has no images: raise data.testing_percentage in params.yaml")
    bad = [k for k in top_k if not 1 <= k <= num_classes]
    if bad:
        raise RetrainError(
            f"evaluate.top_k: {bad[0]} is not between 1 and the number of classes "
            f"({num_classes}); change it in params.yaml"
        )
    return y_true.astype(np.int64), probabilities


def _safe_divide(numerator, denominator):
    """numerator / denominator elementwise, 0 where the denominator is 0."""
    denominator = np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(denominator), where=denominator > 0)
