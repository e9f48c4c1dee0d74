"""Temperature scaling: probabilities that mean what they say, with one number fitted on validation.

A head trained with label smoothing is underconfident (its 0.7 is right 95% of the time); one
trained long without it is overconfident. Guo et al. (2017, "On Calibration of Modern Neural
Networks") fix both with a single scalar T > 0: probabilities = softmax(logits / T), T chosen to
minimise the validation split's log loss. Dividing logits by T never changes which class wins,
so accuracy stays exactly the same, and T folds into the last dense layer (kernel / T, bias / T),
so an exported model needs no new op. Pure numpy and scipy: no TensorFlow.

The measures are `retrain.evaluation`'s (ECE over 15 equal-width confidence bins) and the picture
is `retrain.reports`' reliability diagram, so calibration and the evaluate stage's reports agree.
"""

from pathlib import Path

import numpy as np

from retrain import evaluation, reports
from retrain.errors import RetrainError

LOG_T_BOUNDS = (-5.0, 5.0)  # T in [0.007, 148]: far past any head worth calibrating


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """float64 [N, C] probabilities of logits [N, C] divided by temperature (numerically stable)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def logits_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Logits [N, C] that give back these softmax probabilities (log p; softmax ignores a shift).

    For a model that outputs probabilities only; clipped at evaluation.LOSS_EPSILON like the loss.
    """
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), evaluation.LOSS_EPSILON, 1.0))


def log_loss(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean cross-entropy of softmax(logits / temperature) against integer labels [N]: at T = 1, the
    validation loss the search scores and fine-tuning logs (`evaluation.cross_entropy`)."""
    return evaluation.cross_entropy(labels, logits=np.asarray(logits, dtype=np.float64) / temperature)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 that minimises log_loss(logits, labels, T): logits float [N, C], labels int [N].

    A bounded 1-D search over log T (Brent's method): the loss is unimodal in log T, so this
    finds the optimum without a starting guess or gradients. Fit on validation, never on test.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise RetrainError(
            f"fit_temperature needs logits [N, C] and labels [N], N > 0 (got {logits.shape} and {labels.shape})"
        )
    result = minimize_scalar(
        lambda log_t: log_loss(logits, labels, np.exp(log_t)),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(result.x))


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = evaluation.CALIBRATION_BINS
) -> float:
    """ECE of probabilities [N, C] against labels [N]: evaluate's metric, over `bins` equal bins."""
    return evaluation.expected_calibration_error(evaluation.calibration_bins(labels, np.asarray(probabilities), bins))


def reliability_diagram(probabilities: np.ndarray, labels: np.ndarray, path: Path) -> Path:
    """Write the reliability diagram PNG (accuracy against confidence, ECE in the title) to path."""
    return reports.plot_reliability(path, evaluation.calibration_bins(labels, np.asarray(probabilities)))
