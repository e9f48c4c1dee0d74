"""evaluate: test-split metrics for `dvc metrics`, plots for `dvc plots`, reports for people."""

import csv
import json

import mlflow
import numpy as np

from retrain import paths, tracking
from retrain.errors import exit_on_error
from retrain.evaluation import evaluate_predictions, flatten_metrics
from retrain.features import load_labels, load_split_arrays
from retrain.finetune import evaluation_inputs
from retrain.head import load_head
from retrain.params import load_params
from retrain.reports import top_misclassified, write_reports


def evaluate():
    params = load_params()
    labels = load_labels(paths.FEATURES_DIR)
    features_dir, head = evaluation_inputs()  # the fine-tuned model's when the finetune stage ran enabled
    x_test, y_test, test_paths = load_split_arrays(features_dir, "test")
    probabilities = load_head(head).predict(x_test, batch_size=256, verbose=0)
    metrics = evaluate_predictions(y_test, probabilities, labels, params.evaluate.top_k)
    paths.EVALUATE_DIR.mkdir(parents=True, exist_ok=True)
    paths.METRICS.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    np.savez(paths.PREDICTIONS, probabilities=probabilities, labels=y_test, paths=np.array(test_paths, dtype=str))
    history = _read_history()
    reports = write_reports(paths.REPORTS_DIR, y_test, probabilities, labels, test_paths, history, params.evaluate.top_k)
    run_name = tracking.read_run(paths.RUN_FILE)["run_name"]
    worst = top_misclassified(y_test, probabilities, labels, test_paths, limit=8)
    tracking.log_misclassified_images(paths.LOGS_DIR / run_name, worst)
    with tracking.resumed_run(paths.RUN_FILE):
        mlflow.log_metrics({f"test_{k}": float(v) for k, v in flatten_metrics(metrics, sep="_").items()})
        mlflow.log_artifacts(str(paths.REPORTS_DIR), artifact_path="reports")
        mlflow.log_artifact(str(paths.METRICS))
        if (paths.LOGS_DIR / run_name).is_dir():
            mlflow.log_artifacts(str(paths.LOGS_DIR / run_name), artifact_path="tensorboard")
    print(f"test accuracy {metrics['accuracy']:.4f} on {len(y_test)} images; reports in {paths.REPORTS_DIR}/")
    return reports


def _read_history() -> dict[str, list[float]]:
    with open(paths.HISTORY_CSV, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {key: [float(row[key]) for row in rows] for key in (rows[0] if rows else {}) if key != "epoch"}


if __name__ == "__main__":
    exit_on_error(evaluate)
