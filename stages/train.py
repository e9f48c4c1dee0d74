"""train: fit the classification head on cached features, optionally after a seeded head search."""

import csv
import json
import time

import numpy as np

from retrain import paths
from retrain.augment import load_views_array
from retrain.errors import exit_on_error
from retrain.features import load_labels, load_split_arrays
from retrain.head import save_head
from retrain.params import load_params
from retrain.records import stage_record
from retrain.tensorboard_logs import TensorBoard
from retrain.tf.head_training import to_head, train_head


def train():
    params = load_params()
    labels = load_labels(paths.FEATURES_DIR)
    x_train, y_train, _ = load_split_arrays(paths.FEATURES_DIR, "train")
    x_val, y_val, _ = load_split_arrays(paths.FEATURES_DIR, "validation")
    x_views, y_views = load_views_array(paths.TRAIN_AUGMENTED)  # augment.copies views per train image
    x_train, y_train = np.concatenate([x_train, x_views]), np.concatenate([y_train, y_views])
    head_params, search = params.train, None
    if params.train.search.trials:
        from retrain.tf.search import search_head

        search = search_head((x_train, y_train), (x_val, y_val), len(labels), params.train, params.seed)
        head_params = params.train.model_copy(update=search.best_params)
    weights = {}  # weight histograms for TensorBoard every 10th epoch (cheap copies, written once)
    started = time.perf_counter()
    model, history = train_head(
        (x_train, y_train),
        (x_val, y_val),
        len(labels),
        head_params,
        params.seed,
        on_epoch=lambda epoch, logs, m: _progress(weights, epoch, logs, m, head_params.epochs),
    )
    seconds = time.perf_counter() - started
    save_head(to_head(model), paths.HEAD)
    _write_history(history)
    _write_search(search)
    TensorBoard(paths.TRAIN_TENSORBOARD).write_history(history, weights)
    with stage_record("train") as record:
        for epoch in range(len(history["loss"])):
            record.log_metrics({_metric_name(key): values[epoch] for key, values in history.items()}, step=epoch)
        record.set_tags({"train.epochs": len(history["loss"]), "train.seconds": round(seconds, 3)})
        if search is not None:
            _record_search(record, search)
        record.add_tensorboard(paths.TRAIN_TENSORBOARD / "train", "train")
        record.add_tensorboard(paths.TRAIN_TENSORBOARD / "validation", "validation")
    print(f"head trained for {len(history['loss'])} epochs in {seconds:.2f} s")


def _metric_name(key: str) -> str:
    """Keras history keys → MLflow chart groups: loss → train/loss, val_accuracy → val/accuracy."""
    return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"


def _progress(weights: dict, epoch: int, logs: dict, model, epochs: int) -> None:
    """One line per epoch, as Keras fit printed; weights kept every 10th epoch for TensorBoard."""
    print(f"epoch {epoch + 1}/{epochs}: " + " ".join(f"{k} {v:.4f}" for k, v in logs.items()), flush=True)
    if epoch % 10 == 0:
        weights[epoch] = [(v.path, np.array(v.numpy())) for v in model.trainable_variables]


def _record_search(record, search) -> None:
    """Each trial as a child run of this execution's run: the UI compares them side by side."""
    for trial in search.trials:
        record.add_child(
            f"trial-{trial.number:02d}",
            params={f"train.{k}": v for k, v in trial.params.items()},
            metrics={_metric_name(key): values for key, values in trial.history.items()}
            | {"search/val_loss": [trial.value]},
            tags={"retrain.trial": trial.number, "train.epochs": trial.epochs},
        )
    record.log_metrics({"search/best_val_loss": search.best_value})
    record.set_tags({f"search.best.{key}": value for key, value in search.best_params.items()})


def _write_search(search) -> None:
    """search.json for `dvc exp show`: the best params and their validation loss, or trials 0."""
    record = (
        {"trials": 0}
        if search is None
        else {"trials": len(search.trials), "best_val_loss": search.best_value, "best": search.best_params}
    )
    paths.SEARCH_JSON.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


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
