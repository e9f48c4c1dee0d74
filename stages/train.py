"""train: fit the classification head on cached features; open this pipeline run's MLflow run."""

import csv
import json
import time

import keras
import mlflow
import numpy as np

from retrain import paths, tracking
from retrain.augment import load_views_array
from retrain.errors import exit_on_error
from retrain.features import load_labels, load_split_arrays
from retrain.head import save_head, train_head
from retrain.params import flatten, load_params


def train():
    params = load_params()
    labels = load_labels(paths.FEATURES_DIR)
    x_train, y_train, _ = load_split_arrays(paths.FEATURES_DIR, "train")
    x_val, y_val, _ = load_split_arrays(paths.FEATURES_DIR, "validation")
    x_views, y_views = load_views_array(paths.TRAIN_AUGMENTED)  # augment.copies views per train image
    x_train, y_train = np.concatenate([x_train, x_views]), np.concatenate([y_train, y_views])
    meta = json.loads((paths.FEATURES_DIR / "meta.json").read_text())
    run_id = tracking.start_run(
        params.tracking.experiment,
        flatten(params),
        {"backbone_id": meta["backbone_id"], "dataset_hash": meta["dataset_hash"]},
        paths.RUN_FILE,
    )
    run_name = tracking.read_run(paths.RUN_FILE)["run_name"]
    with tracking.resumed_run(paths.RUN_FILE):
        if paths.BOTTLENECKS_STATS.exists():
            stats = json.loads(paths.BOTTLENECKS_STATS.read_text())
            mlflow.log_metrics({f"bottlenecks_{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float))})
        # Weight histograms every 10th epoch: each costs ~0.15 s, more than an epoch of training.
        board = keras.callbacks.TensorBoard(str(paths.LOGS_DIR / run_name), histogram_freq=10)
        started = time.perf_counter()
        model, history = train_head(
            (x_train, y_train), (x_val, y_val), len(labels), params.train, params.seed,
            callbacks=[tracking.EpochLogger(), board],
        )
        seconds = time.perf_counter() - started
        save_head(model, paths.HEAD)
        _write_history(history)
        mlflow.log_metrics({"epochs_trained": len(history["loss"]), "train_seconds": round(seconds, 3)})
    print(f"head trained for {len(history['loss'])} epochs in {seconds:.2f} s; MLflow run {run_id} ({run_name})")


def _write_history(history: dict[str, list[float]]) -> None:
    """history.csv: one row per epoch, the learning curves `dvc plots show` draws."""
    keys = list(history)
    with open(paths.HISTORY_CSV, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", *keys])
        for epoch, values in enumerate(zip(*(history[k] for k in keys))):
            writer.writerow([epoch, *values])


if __name__ == "__main__":
    exit_on_error(train)
