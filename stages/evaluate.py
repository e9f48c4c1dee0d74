"""evaluate: test-split metrics for `dvc metrics`, plots for `dvc plots`, reports for people.

Reads the one model that goes on (data/finetune/: fine-tuned or the frozen head, with the test
features its backbone gives), never asking which stage produced it.
"""

import csv
import json

import numpy as np

from retrain import paths
from retrain.errors import RetrainError, exit_on_error
from retrain.evaluation import calibration_bins, evaluate_predictions, expected_calibration_error, mlflow_metrics
from retrain.features import load_labels, load_split_arrays
from retrain.head import load_head, softmax
from retrain.params import load_params
from retrain.records import stage_record
from retrain.reports import top_misclassified, write_reports
from retrain.tensorboard_logs import TensorBoard


def evaluate():
    params = load_params()
    labels = load_labels(paths.FINETUNE_DIR)
    x_test, y_test, test_paths = load_split_arrays(paths.FINETUNE_DIR, "test")
    if not len(y_test):
        raise RetrainError(
            "the test split is empty, nothing to evaluate; raise "
            "data.testing_percentage or add images, then rerun `dvc repro`"
        )
    logits = load_head(paths.FINETUNE_HEAD).logits(x_test)
    probabilities = softmax(logits)
    metrics = evaluate_predictions(y_test, probabilities, labels, params.evaluate.top_k)
    # The head is calibrated (finetune folds a temperature into it): the ECE it had before, for comparison.
    temperature = json.loads(paths.FINETUNE_JSON.read_text()).get("temperature", 1.0)
    metrics["ece_uncalibrated"] = expected_calibration_error(calibration_bins(y_test, softmax(logits * temperature)))
    metrics["temperature"] = temperature
    paths.EVALUATE_DIR.mkdir(parents=True, exist_ok=True)
    # Per-class numbers go to reports/per_class.csv and MLflow; metrics.json keeps the model's
    # headline numbers, one column each in `dvc exp show`.
    headline = {key: value for key, value in metrics.items() if key != "per_class"}
    paths.METRICS.write_text(json.dumps(headline, indent=2, sort_keys=True) + "\n")
    np.savez(paths.PREDICTIONS, probabilities=probabilities, labels=y_test, paths=np.array(test_paths, dtype=str))
    reports = write_reports(
        paths.REPORTS_DIR, y_test, probabilities, labels, test_paths, _read_history(), params.evaluate.top_k
    )
    misclassified = top_misclassified(y_test, probabilities, labels, test_paths, limit=8)
    TensorBoard(paths.EVALUATE_TENSORBOARD).write_misclassified(misclassified)
    with stage_record("evaluate") as record:
        record.log_metrics(mlflow_metrics(metrics))
        record.log_artifacts(paths.REPORTS_DIR, "reports")
        record.log_artifacts(paths.METRICS)
        record.add_tensorboard(paths.EVALUATE_TENSORBOARD / "test", "test")
    print(f"test accuracy {metrics['accuracy']:.4f} on {len(y_test)} images; reports in {paths.REPORTS_DIR}/")
    return reports


def _read_history() -> dict[str, list[float]]:
    with open(paths.HISTORY_CSV, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {key: [float(row[key]) for row in rows] for key in (rows[0] if rows else {}) if key != "epoch"}


if __name__ == "__main__":
    exit_on_error(evaluate)
