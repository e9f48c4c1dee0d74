"""The head: learns separable features, seeded and bit-for-bit reproducible."""

import numpy as np

from retrain.head import class_weights, dense_layers, load_head, save_head, train_head
from retrain.params import load_params


def _blobs(n, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    centres = np.eye(3, 16, dtype=np.float32) * 4
    return (centres[labels] + rng.normal(size=(n, 16))).astype(np.float32), labels.astype(np.int32)


def test_same_seed_same_weights_and_the_head_learns(tmp_path):
    params = load_params().train.model_copy(update={"epochs": 5, "learning_rate": 0.05})
    train, validation = _blobs(90, 0), _blobs(30, 1)
    first, history = train_head(train, validation, 3, params, seed=7)
    second, _ = train_head(train, validation, 3, params, seed=7)
    for (k1, b1, _), (k2, b2, _) in zip(dense_layers(first), dense_layers(second)):
        assert np.array_equal(k1, k2) and np.array_equal(b1, b2)
    assert history["val_accuracy"][-1] > 0.9
    save_head(first, tmp_path / "head.keras")
    reloaded = load_head(tmp_path / "head.keras")
    np.testing.assert_array_equal(reloaded.predict(validation[0], verbose=0), first.predict(validation[0], verbose=0))


def test_hidden_layer_and_balanced_weights():
    params = load_params().train.model_copy(update={"epochs": 2, "hidden_units": 8, "class_weights": "balanced"})
    model, _ = train_head(_blobs(60, 0), _blobs(12, 1), 3, params, seed=0)
    assert [activation for _, _, activation in dense_layers(model)] == ["relu", "softmax"]
    weights = class_weights(np.array([0, 0, 0, 1]), 2)
    assert weights[1] == 3 * weights[0]
