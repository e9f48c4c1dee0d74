"""train: fit the classification head on cached features, optionally after a seeded head search."""

import csv
import json
import time

import numpy as np

from retrain import paths, tracking
from retrain.augment import load_views_array
from retrain.errors import exit_on_error
from retrain.features import load_labels, load_split_arrays
from retrain.head import save_head
from retrain.params import load_params
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
    with tracking.stage_run("train", params) as run:
        for epoch in range(len(history["loss"])):
            run.log_metrics({_metric_name(key): values[epoch] for key, values in history.items()}, step=epoch)
        run.set_tags({"train.epochs": len(history["loss"]), "train.seconds": round(seconds, 3)})
        if search is not None:
            _log_search(run, search)
        board = TensorBoard(run.run_name)
        board.write_history(history, weights)
        import mlflow

        mlflow.log_artifacts(str(board.folder), artifact_path="tensorboard")
    print(
        f"head trained for {len(history['loss'])} epochs in {seconds:.2f} s; MLflow run {run.run_id} ({run.run_name})"
    )


def _metric_name(key: str) -> str:
    """Keras history keys → MLflow chart groups: loss → train/loss, val_accuracy → val/accuracy."""
    return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"


def _progress(weights: dict, epoch: int, logs: dict, model, epochs: int) -> None:
    """One line per epoch, as Keras fit printed; weights kept every 10th epoch for TensorBoard."""
    print(f"epoch {epoch + 1}/{epochs}: " + " ".join(f"{k} {v:.4f}" for k, v in logs.items()), flush=True)
    if epoch % 10 == 0:
        weights[epoch] = [(v.path, np.array(v.numpy())) for v in model.trainable_variables]


def _log_search(run, search) -> None:
    """Each trial as a child run of this execution's run: the UI compares them side by side."""
    from mlflow.entities import Metric, Param, RunTag

    for trial in search.trials:
        child = run.client.create_run(
            run.experiment_id,
            run_name=f"{run.run_name}-trial-{trial.number:02d}",
            tags={"mlflow.parentRunId": run.run_id, "retrain.trial": str(trial.number)},
        )
        history, now = trial.history, int(time.time() * 1000)
        metrics = [
            Metric(_metric_name(key), value, now, step)
            for key, values in history.items()
            for step, value in enumerate(values)
        ]
        metrics.append(Metric("search/val_loss", trial.value, now, 0))
        run.client.log_batch(
            child.info.run_id,
            metrics=metrics[:1000],
            params=[Param(f"train.{k}", str(v)) for k, v in trial.params.items()],
            tags=[RunTag("train.epochs", str(trial.epochs))],
        )
        run.client.set_terminated(child.info.run_id)
    run.log_metrics({"search/best_val_loss": search.best_value})
    run.set_tags({f"search.best.{key}": value for key, value in search.best_params.items()})


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
