"""How fast is the head? Its fit against the Keras `fit` it replaced, and the 20-trial search.

On the flowers' features (a pipeline run's `data/features/`, which `make bench` passes in) or,
without them, random features of the same shape (1,929 x 1,280, 5 classes, 228 validation rows),
and the output says which. Figures:

  - fit: `retrain.head.train_head` and the Keras `fit` way it replaced (`keras_fit`, below: the
    code of retrain/head.py up to 2ec4a1b), interleaved in one process, default params for a
    fixed 28 epochs (patience 28: both train every epoch, as the issue's 28-epoch fit did);
    median wall seconds over rounds, with CPU seconds (the machine is shared: CPU time shows
    whether a slow round was ours). Both rebuild and retrace their model every round, as a train
    stage does once; one tiny fit of each first keeps TensorFlow's one-off start-up out of both.
  - default params as shipped (early stopping): the new fit's epochs and seconds.
  - search: `retrain.search.search_head` with `trials` trials (default 20), wall seconds.

    .venv/bin/python benchmarks/bench_head.py [--features data/features] [--rounds 3] [--trials 20]
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

import numpy as np  # noqa: E402

from retrain.params import load_params  # noqa: E402

FIT_EPOCHS = 28  # the fit: 28 epochs of default params on the flowers
FIT_TARGET_S = 4.0
SEARCH_TARGET_S = 180.0


def features(features_dir: Path | None):
    """((x, y) train, (x, y) validation, classes, description): real arrays if there, else random."""
    if features_dir is not None and (Path(features_dir) / "train.npz").exists():
        from retrain.features import load_labels, load_split_arrays

        train, validation = (load_split_arrays(features_dir, split)[:2] for split in ("train", "validation"))
        if len(validation[1]):  # a few generated images may leave none, and the search needs some
            return (
                train,
                validation,
                len(load_labels(features_dir)),
                f"{len(train[1])} x {train[0].shape[1]} features of {features_dir}",
            )
    rng = np.random.default_rng(0)
    centres = rng.gamma(1.0, 0.3, size=(5, 1280)).astype(np.float32)  # non-negative, like pooled ReLU features

    def split(n):
        labels = rng.integers(0, 5, n).astype(np.int32)
        return np.abs(centres[labels] + rng.normal(0, 0.6, (n, 1280))).astype(np.float32), labels

    return split(1929), split(228), 5, "random features 1929 x 1280, 5 classes (no features with validation rows given)"


def keras_fit(train, validation, num_classes, params, seed):
    """The head's training as it was: Keras `fit`, a whole epoch per call, early stopping."""
    import contextlib
    import io

    import keras

    from retrain.tf.head_training import _optimizer, build_head, class_weights, set_seed

    set_seed(seed)
    (x_train, y_train), (x_val, y_val) = train, validation
    model = build_head(x_train.shape[1], num_classes, params)
    steps = -(-len(y_train) // params.batch_size)
    model.compile(
        optimizer=_optimizer(params, params.epochs * steps),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing),
        metrics=["accuracy"],
        steps_per_execution=steps,
    )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=params.early_stopping_patience, restore_best_weights=True
    )
    with contextlib.redirect_stdout(io.StringIO()):  # fit's verbose=2 line per epoch, as it was
        history = model.fit(
            x_train,
            keras.utils.to_categorical(y_train, num_classes),
            validation_data=(x_val, keras.utils.to_categorical(y_val, num_classes)),
            epochs=params.epochs,
            batch_size=params.batch_size,
            class_weight=class_weights(y_train, num_classes) if params.class_weights == "balanced" else None,
            callbacks=[stop],
            shuffle=True,
            verbose=2,
        )
    return model, history.history


def timed(fit, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    _, history = fit(*args)
    return {
        "wall_s": round(time.perf_counter() - wall, 3),
        "cpu_s": round(time.process_time() - cpu, 3),
        "epochs": len(history["loss"]),
        "best_val_loss": round(min(history["val_loss"]), 4),
    }


def fit_figures(train, validation, classes, rounds: int, seed: int) -> dict:
    from retrain.tf.head_training import train_head

    params = load_params(HERE.parent / "params.yaml").train
    fixed = params.model_copy(update={"epochs": FIT_EPOCHS, "early_stopping_patience": FIT_EPOCHS})
    tiny = (train[0][:64], train[1][:64]), (validation[0][:16], validation[1][:16])
    for fit in (keras_fit, train_head):  # TensorFlow's one-off start-up (threads, kernels) off the clock
        fit(*tiny, classes, fixed.model_copy(update={"epochs": 1}), seed)
    out = {"keras_fit": [], "train_head": []}
    for _ in range(rounds):  # interleaved: a busy moment of the machine hits both
        out["keras_fit"].append(timed(keras_fit, train, validation, classes, fixed, seed))
        out["train_head"].append(timed(train_head, train, validation, classes, fixed, seed))
    out["default_params"] = timed(train_head, train, validation, classes, params, seed)
    for key in ("keras_fit", "train_head"):
        out[f"{key}_median_s"] = statistics.median(r["wall_s"] for r in out[key])
        out[f"{key}_median_cpu_s"] = statistics.median(r["cpu_s"] for r in out[key])
    return out


def search_figures(train, validation, classes, trials: int, seed: int) -> dict:
    from retrain.tf.search import search_head

    params = load_params(HERE.parent / "params.yaml").train
    params = params.model_copy(update={"search": params.search.model_copy(update={"trials": trials})})
    wall, cpu = time.perf_counter(), time.process_time()
    result = search_head(train, validation, classes, params, seed)
    return {
        "trials": trials,
        "wall_s": round(time.perf_counter() - wall, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
        "epochs": [t.epochs for t in result.trials],
        "best_value": round(result.best_value, 4),
        "best_params": result.best_params,
    }


def figures(features_dir: Path | None = None, rounds: int = 3, trials: int = 20, seed: int = 42) -> dict:
    train, validation, classes, source = features(features_dir)
    out = {"data": source, "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    out["fit"] = fit_figures(train, validation, classes, rounds, seed)
    if trials:
        out["search"] = search_figures(train, validation, classes, trials, seed)
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def rows(head: dict) -> list[dict]:
    """Table rows in benchmarks/run.py's form (figure, value, target, pass)."""
    fit, search, default = head["fit"], head.get("search"), head["fit"]["default_params"]
    new, old = fit["train_head_median_s"], fit["keras_fit_median_s"]
    rounds = " / ".join(f"{a['wall_s']:.2f}-{b['wall_s']:.2f}" for a, b in zip(fit["keras_fit"], fit["train_head"]))
    out = [
        {
            "figure": f"head fit, default params, {FIT_EPOCHS} epochs, median (bench_head.py)",
            "value": f"{new:.2f} s (CPU {fit['train_head_median_cpu_s']:.2f} s); Keras fit {old:.2f} s "
            f"(CPU {fit['keras_fit_median_cpu_s']:.2f} s), {old / new:.1f}x; rounds Keras-ours {rounds}; "
            f"{head['data']}",
            "target": f"≤ {FIT_TARGET_S:g} s",
            "pass": new <= FIT_TARGET_S,
        },
        {
            "figure": "head fit, default params with early stopping",
            "value": f"{default['wall_s']:.2f} s, {default['epochs']} epochs, best val loss {default['best_val_loss']}",
            "target": "",
            "pass": None,
        },
    ]
    if search:
        out.append(
            {
                "figure": f"head search, {search['trials']} trials (Optuna TPE, seeded)",
                "value": f"{search['wall_s']:.0f} s (CPU {search['cpu_s']:.0f} s), epochs per trial {search['epochs']}, "
                f"best val loss {search['best_value']}",
                "target": f"≤ {SEARCH_TARGET_S:g} s",
                "pass": search["wall_s"] <= SEARCH_TARGET_S,
            }
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, default=None, help="a data/features folder (default: random features)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each fit (median)")
    parser.add_argument("--trials", type=int, default=20, help="trials of the search (0: no search)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    head = figures(args.features, args.rounds, args.trials)
    for row in rows(head):
        verdict = "" if row["pass"] is None else ("PASS" if row["pass"] else "FAIL")
        print(f"| {row['figure']} | {row['value']} | {row['target']} | {verdict} |")
    print(f"load average {head['load_average_at_start'][0]} at start, {head['load_average_at_end'][0]} at end")
    if args.json:
        args.json.write_text(json.dumps(head, indent=2) + "\n")
    return 0 if all(row["pass"] is not False for row in rows(head)) else 1


if __name__ == "__main__":
    sys.exit(main())
