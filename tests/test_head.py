"""The head: learns separable features, seeded and bit-for-bit reproducible, Keras fit's maths."""

import keras
import numpy as np
import pytest

from default_params import default_params
from retrain.errors import RetrainError
from retrain.head import load_head, save_head
from retrain.tf.head_training import _EpochLoop, _optimizer, build_head, class_weights, set_seed, to_head, train_head


def _blobs(n, seed, classes=3, dim=16, spread=4.0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = np.eye(classes, dim, dtype=np.float32) * spread
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels.astype(np.int32)


def _weights(model):
    head = to_head(model)
    return [array for kernel, bias in zip(head.kernels, head.biases) for array in (kernel, bias)]


def test_same_seed_same_weights_and_the_head_learns(tmp_path):
    params = default_params().train.model_copy(update={"epochs": 5, "learning_rate": 0.05})
    train, validation = _blobs(90, 0), _blobs(30, 1)
    seen = []
    first, history = train_head(
        train, validation, 3, params, seed=7, on_epoch=lambda e, logs, m: seen.append((e, logs))
    )
    second, again = train_head(train, validation, 3, params, seed=7)
    for a, b in zip(_weights(first), _weights(second)):
        assert np.array_equal(a, b)
    assert history == again
    other, _ = train_head(train, validation, 3, params, seed=8)
    assert not np.array_equal(_weights(first)[0], _weights(other)[0])
    assert history["val_accuracy"][-1] > 0.9
    assert [e for e, _ in seen] == list(range(5))
    assert set(seen[0][1]) == {"loss", "accuracy", "val_loss", "val_accuracy"} == set(history)
    assert [logs["val_loss"] for _, logs in seen] == history["val_loss"]
    save_head(to_head(first), tmp_path / "head.npz")
    reloaded = load_head(tmp_path / "head.npz")
    np.testing.assert_allclose(
        reloaded.probabilities(validation[0]), first.predict(validation[0], verbose=0), atol=1e-6
    )


def test_early_stopping_ends_on_the_best_epochs_weights():
    # Random labels: the head memorises train, and validation loss rises after a few epochs.
    rng = np.random.default_rng(0)
    train = rng.normal(size=(64, 32)).astype(np.float32), rng.integers(0, 3, 64).astype(np.int32)
    validation = rng.normal(size=(32, 32)).astype(np.float32), rng.integers(0, 3, 32).astype(np.int32)
    params = default_params().train.model_copy(
        update={"epochs": 40, "early_stopping_patience": 3, "learning_rate": 0.02, "hidden_units": 64, "dropout": 0.0}
    )
    snapshots = []
    model, history = train_head(
        train, validation, 3, params, seed=0, on_epoch=lambda e, logs, m: snapshots.append(_weights(m))
    )
    best = int(np.argmin(history["val_loss"]))
    assert len(history["val_loss"]) == best + 1 + 3 < 40  # stopped `patience` epochs after the best
    for restored, at_best in zip(_weights(model), snapshots[best]):
        assert np.array_equal(restored, at_best)
    assert not np.array_equal(_weights(model)[0], snapshots[-1][0])


def test_without_validation_it_monitors_the_training_loss():
    params = default_params().train.model_copy(update={"epochs": 3})
    empty = np.zeros((0, 16), np.float32), np.zeros(0, np.int32)
    _, history = train_head(_blobs(30, 0), empty, 3, params, seed=0)
    assert set(history) == {"loss", "accuracy"} and len(history["loss"]) == 3


def test_hidden_layer_and_balanced_weights():
    params = default_params().train.model_copy(update={"epochs": 2, "hidden_units": 8, "class_weights": "balanced"})
    model, _ = train_head(_blobs(60, 0), _blobs(12, 1), 3, params, seed=0)
    assert to_head(model).activations == ["relu", "softmax"]
    weights = class_weights(np.array([0, 0, 0, 1]), 2)
    assert weights[1] == 3 * weights[0]


def test_balanced_class_weights_lift_the_rare_class():
    # Overlapping classes, 20 of 21 train examples in class 0: unweighted, the head mostly says 0.
    x, y = _blobs(400, 0, classes=2, dim=8, spread=1.0)
    keep = (y == 0) | (np.arange(400) % 40 == 1)
    train, validation = (x[keep], y[keep]), _blobs(200, 1, classes=2, dim=8, spread=1.0)
    params = default_params().train.model_copy(update={"epochs": 15, "hidden_units": 0, "learning_rate": 0.05})

    def rare_recall(kind):
        model, _ = train_head(train, validation, 2, params.model_copy(update={"class_weights": kind}), seed=0)
        predicted = model.predict(validation[0], verbose=0).argmax(1)
        return np.mean(predicted[validation[1] == 1] == 1)

    assert rare_recall("balanced") > rare_recall("none") + 0.15  # 0.75 vs 0.48 when written


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])  # adam: our fused kernel; the others: Keras's
def test_an_epoch_is_keras_fits_epoch(optimizer):
    """Same order, no dropout: one epoch of the loop is `fit`'s epoch (loss, class weights, L2, schedule)."""
    train = _blobs(70, 0)
    params = default_params().train.model_copy(
        update={
            "epochs": 3,
            "hidden_units": 8,
            "dropout": 0.0,
            "l2": 1e-3,
            "class_weights": "balanced",
            "batch_size": 16,
            "optimizer": optimizer,
        }
    )
    steps, weights = 5, class_weights(train[1], 3)

    set_seed(3)
    reference = build_head(16, 3, params)
    start = reference.get_weights()
    reference.compile(
        optimizer=_optimizer(params, 3 * steps),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing),
    )
    fitted = reference.fit(
        train[0],
        keras.utils.to_categorical(train[1], 3),
        epochs=3,
        batch_size=16,
        class_weight=weights,
        shuffle=False,
        verbose=0,
    ).history["loss"]

    model = build_head(16, 3, params)
    model.set_weights(start)
    loop = _EpochLoop(model, 3 * steps, params, 3, seed=3)
    w = np.array([weights[label] for label in train[1]], np.float32)
    ours = [
        float(loop.train_epoch(train[0], train[1], w, np.arange(70, dtype=np.int32), np.int64(e))["loss"])
        for e in range(3)
    ]
    np.testing.assert_allclose(ours, fitted, rtol=1e-5)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mismatched_arrays_are_a_one_line_error():
    params = default_params().train.model_copy(update={"epochs": 1})
    x, y = _blobs(30, 0)
    with pytest.raises(RetrainError, match="train split: expected features"):
        train_head((x, y[:-1]), _blobs(6, 1), 3, params, seed=0)
    with pytest.raises(RetrainError, match=r"validation split: labels must be in \[0, 3\)"):
        train_head((x, y), (x[:2], np.array([0, 5], np.int32)), 3, params, seed=0)
