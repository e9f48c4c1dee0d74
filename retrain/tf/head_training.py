"""Training the classification head (`retrain.head` defines it) on cached features.

Training needs no backbone and no images, so a sweep over head params costs seconds. It is Keras
`fit`'s maths (optimizer, schedule, label smoothing, class weights, early stopping with the best
weights restored) in a hand-written loop that makes one TensorFlow call per epoch: `fit` spent
more of its 9-12 s on the flowers in its own machinery than in the matrix products. Seeded (the
shuffle per epoch, the dropout masks per step, the initial weights) and run with TensorFlow op
determinism: the same features and params give the same weights, bit for bit.
"""

import keras
import numpy as np
import tensorflow as tf

from retrain.errors import RetrainError
from retrain.head import Head, architecture, logits
from retrain.params import TrainParams
from retrain.tf import TF_OPS


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow, and make TensorFlow's ops deterministic."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def build_head(feature_dim: int, num_classes: int, params: TrainParams) -> keras.Model:
    """The head of `retrain.head.architecture` as Keras layers: Keras initialises and holds the
    variables (and its optimizers update them); the forward pass is always `retrain.head.logits`."""
    regularizer = keras.regularizers.L2(params.l2) if params.l2 else None
    inputs = keras.Input(shape=(feature_dim,), dtype="float32", name="features")
    x = inputs
    for i, (_, units, activation) in enumerate(
        architecture(feature_dim, num_classes, params.hidden_units, params.activation)
    ):
        if activation == "softmax":
            x = keras.layers.Dropout(params.dropout, name="dropout")(x)
        x = keras.layers.Dense(
            units,
            activation=activation,
            kernel_regularizer=regularizer,
            name="probabilities" if activation == "softmax" else f"hidden_{i}",
        )(x)
    return keras.Model(inputs, x, name="head")


def keras_head(head: Head, dropout: float = 0.0) -> keras.Model:
    """A trained `Head` as Keras layers (for fine-tuning), with its weights."""
    inputs = keras.Input(shape=(head.feature_dim,), dtype="float32", name="features")
    x = inputs
    for i, (kernel, bias, activation) in enumerate(head.layers):
        if activation == "softmax":
            x = keras.layers.Dropout(dropout, name="dropout")(x)
        layer = keras.layers.Dense(kernel.shape[1], activation=activation, name=f"dense_{i}")
        x = layer(x)
        layer.set_weights([kernel, bias])
    return keras.Model(inputs, x, name="head")


def dense_variables(model: keras.Model) -> list[tuple]:
    """The model's dense layers as (kernel, bias, activation) of tf.Variables: `logits`' layers."""
    return [
        (layer.kernel.value, layer.bias.value, layer.activation.__name__)
        for layer in model.layers
        if isinstance(layer, keras.layers.Dense)
    ]


def head_logits(model: keras.Model, x, dropout=None):
    """`retrain.head.logits` of a Keras head on TensorFlow tensors."""
    return logits(dense_variables(model), x, TF_OPS, dropout)


def smoothed_cross_entropy(logits, labels, num_classes: int, smoothing: float):
    """float32 [N] training loss per sample: cross-entropy of logits [N, C] against int labels [N]
    with targets smoothed as Keras' `CategoricalCrossentropy(label_smoothing)` does. The head's and
    fine-tuning's training loss; every loss that judges a head is `evaluation.cross_entropy`."""
    targets = tf.one_hot(labels, num_classes) * (1.0 - smoothing) + smoothing / num_classes
    return tf.nn.softmax_cross_entropy_with_logits(targets, logits)


def to_head(model: keras.Model) -> Head:
    """The Keras head's weights as a `retrain.head.Head` (what is saved, evaluated and exported)."""
    layers = [(np.array(k.numpy()), np.array(b.numpy()), a) for k, b, a in dense_variables(model)]
    return Head([k for k, _, _ in layers], [b for _, b, _ in layers], [a for _, _, a in layers])


def _learning_rate(params: TrainParams, total_steps: int):
    """The rate, or a schedule of it by step; cosine decays to 0 at `epochs` (early stopping may end sooner)."""
    if params.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(params.learning_rate, decay_steps=max(1, total_steps))
    return params.learning_rate


def _optimizer(params: TrainParams, total_steps: int) -> keras.optimizers.Optimizer:
    rate = _learning_rate(params, total_steps)
    if params.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=0.9)
    kinds = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW, "rmsprop": keras.optimizers.RMSprop}
    return kinds[params.optimizer](rate)


class _FusedAdam:
    """Keras's Adam (its defaults, its schedule by step) as one fused kernel per variable and step.

    `ResourceApplyAdam` computes Keras's formula (alpha = lr * sqrt(1 - b2^t) / (1 - b1^t), m and v
    moved towards g and g^2, var -= alpha * m / (sqrt(v) + eps)) in one pass over the variable;
    Keras's own update is eight elementwise ops, and was a third of an epoch's CPU time.
    """

    beta_1, beta_2, epsilon = 0.9, 0.999, 1e-7  # keras.optimizers.Adam's defaults

    def __init__(self, rate, variables):
        self.rate, self.variables = rate, variables
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.m = [tf.Variable(tf.zeros_like(v)) for v in variables]
        self.v = [tf.Variable(tf.zeros_like(v)) for v in variables]

    def apply(self, grads, variables):
        rate = self.rate(self.iterations) if callable(self.rate) else self.rate
        t = tf.cast(self.iterations + 1, tf.float32)
        b1, b2 = tf.constant(self.beta_1), tf.constant(self.beta_2)
        for grad, variable, m, v in zip(grads, variables, self.m, self.v):
            tf.raw_ops.ResourceApplyAdam(
                var=variable.handle,
                m=m.handle,
                v=v.handle,
                beta1_power=tf.pow(b1, t),
                beta2_power=tf.pow(b2, t),
                lr=tf.cast(rate, tf.float32),
                beta1=b1,
                beta2=b2,
                epsilon=tf.constant(self.epsilon),
                grad=grad,
            )
        self.iterations.assign_add(1)


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """'balanced' weights n / (C * count_c): every class contributes equally to the loss."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1))
    return {i: float(w) for i, w in enumerate(weights)}


def train_head(
    train: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    params: TrainParams,
    seed: int,
    on_epoch=None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Fit a head on (float32 features [N, D], int labels [N]); returns the model and its history.

    The model holds the best epoch's weights (lowest `val_loss`, or `loss` without validation data;
    validation may have N=0). History: `loss`, `accuracy`, `val_loss`, `val_accuracy` (val_* only
    with validation), one value per epoch trained. `on_epoch(epoch, logs, model)` runs after every
    epoch, before early stopping decides.
    """
    set_seed(seed)
    (x_train, y_train), (x_val, y_val) = (
        _checked(train, "train", num_classes),
        _checked(validation, "validation", num_classes),
    )
    model = build_head(x_train.shape[1], num_classes, params)
    steps = -(-len(y_train) // params.batch_size)
    loop = _EpochLoop(model, params.epochs * steps, params, num_classes, seed)
    weights = class_weights(y_train, num_classes) if params.class_weights == "balanced" else None
    x, y, w = tf.constant(x_train), tf.constant(y_train), tf.constant(_sample_weights(y_train, weights))
    validation_data = (tf.constant(x_val), tf.constant(y_val)) if len(y_val) else None
    stopper = _EarlyStopping(loop.variables, params.early_stopping_patience)
    history: dict[str, list[float]] = {}
    for epoch in range(params.epochs):
        # A fresh, seeded order each epoch: run k reproduces run k of any other fit with this seed.
        order = tf.constant(np.random.default_rng([seed, epoch]).permutation(len(y_train)), tf.int32)
        logs = loop.train_epoch(x, y, w, order, tf.constant(epoch, tf.int64))
        if validation_data is not None:
            logs.update(loop.evaluate(*validation_data))
        logs = {key: float(value) for key, value in logs.items()}
        for key, value in logs.items():
            history.setdefault(key, []).append(value)
        if on_epoch is not None:
            on_epoch(epoch, logs, model)
        if stopper.stop_after(epoch, logs["val_loss" if validation_data is not None else "loss"]):
            break
    stopper.restore_best()
    return model, history


def _checked(split: tuple[np.ndarray, np.ndarray], name: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    features, labels = np.asarray(split[0], np.float32), np.asarray(split[1], np.int32)
    if features.ndim != 2 or labels.shape != (len(features),):
        raise RetrainError(
            f"{name} split: expected features [N, D] and labels [N], got {features.shape} and {labels.shape}; "
            "rerun the bottlenecks stage"
        )
    if name == "train" and not len(labels):
        raise RetrainError("train split: no examples; add images or lower data.validation/testing_percentage")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise RetrainError(f"{name} split: labels must be in [0, {num_classes}); rerun the bottlenecks stage")
    return features, labels


def _sample_weights(labels: np.ndarray, weights: dict[int, float] | None) -> np.ndarray:
    if weights is None:
        return np.ones(len(labels), np.float32)
    return np.array([weights[int(label)] for label in labels], np.float32)


class _EpochLoop:
    """One compiled TensorFlow call per epoch: Keras `fit`'s maths without its per-epoch overhead.

    The same steps as `fit` with `class_weight` and a `CategoricalCrossentropy(label_smoothing)`
    loss on the softmax's logits: batches of `batch_size` in the given order (the last one short),
    the loss a batch mean of per-sample weighted cross-entropy plus the layers' L2 penalties, the
    optimizer and its schedule applied to the model's own variables (Adam fused, the others
    Keras's; tests/test_head.py checks both against `fit`). Dropout masks come from a stateless
    generator keyed by (seed, step), so they do not depend on anything else run before.
    """

    def __init__(self, model: keras.Model, total_steps: int, params: TrainParams, num_classes: int, seed: int):
        self.model = model
        self.layers = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
        self.variables = [v for layer in self.layers for v in (layer.kernel, layer.bias)]
        self.params, self.num_classes, self.seed = params, num_classes, seed
        if params.optimizer == "adam":
            self.optimizer = _FusedAdam(_learning_rate(params, total_steps), self.variables)
        else:
            self.optimizer = _optimizer(params, total_steps)
            self.optimizer.build(self.variables)
        self.train_epoch, self.evaluate = _compiled(self._train_epoch), _compiled(self._evaluate)

    def _logits(self, x, training: bool, step=None):
        dropout = None
        if training and self.params.dropout:
            seed = tf.stack([tf.constant(self.seed, tf.int64), step])
            dropout = lambda x: tf.nn.experimental.stateless_dropout(x, self.params.dropout, seed=seed)  # noqa: E731
        return head_logits(self.model, x, dropout)

    def _losses(self, logits, labels):
        """Per-sample smoothed cross-entropy, and the L2 penalty of the kernels (0 without l2)."""
        penalty = (
            tf.add_n([self.params.l2 * tf.reduce_sum(tf.square(layer.kernel.value)) for layer in self.layers])
            if self.params.l2
            else tf.constant(0.0)
        )
        return smoothed_cross_entropy(logits, labels, self.num_classes, self.params.label_smoothing), penalty

    def _train_epoch(self, x, y, w, order, epoch):
        n, batch = tf.shape(order)[0], self.params.batch_size
        steps = (n + batch - 1) // batch
        x, y, w = tf.gather(x, order), tf.gather(y, order), tf.gather(w, order)

        def step(i, loss_sum, correct):
            start = i * batch
            xb, yb, wb = x[start : start + batch], y[start : start + batch], w[start : start + batch]
            with tf.GradientTape() as tape:
                logits = self._logits(xb, True, epoch * tf.cast(steps, tf.int64) + tf.cast(i, tf.int64))
                per_sample, penalty = self._losses(logits, yb)
                loss = tf.reduce_mean(per_sample * wb) + penalty
            self.optimizer.apply(tape.gradient(loss, self.variables), self.variables)
            # Like fit's running mean: each batch's loss and hits weighted by its size.
            hits = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int32), yb), tf.int32))
            return i + 1, loss_sum + loss * tf.cast(tf.shape(yb)[0], tf.float32), correct + hits

        _, loss_sum, correct = tf.while_loop(lambda i, *_: i < steps, step, (0, 0.0, 0))
        count = tf.cast(n, tf.float32)
        return {"loss": loss_sum / count, "accuracy": tf.cast(correct, tf.float32) / count}

    def _evaluate(self, x, y):
        logits = self._logits(x, False)
        per_sample, penalty = self._losses(logits, y)
        hits = tf.equal(tf.argmax(logits, 1, output_type=tf.int32), y)
        return {
            "val_loss": tf.reduce_mean(per_sample) + penalty,
            "val_accuracy": tf.reduce_mean(tf.cast(hits, tf.float32)),
        }


def _compiled(method):
    """A tf.function of `method`, traced once per head (its graph holds this head's variables).

    No autograph (the loop is an explicit tf.while_loop): converting the source costs ~0.7 s. A
    fresh wrapper per head, because TensorFlow counts traces per Python function and warns of
    "excessive retracing" when a search fits its 5th head through the same one.
    """
    return tf.function(lambda *args: method(*args), autograph=False, reduce_retracing=True)


class _EarlyStopping:
    """Keras `EarlyStopping(patience, restore_best_weights=True)`: stop after `patience` epochs
    without a lower monitored loss, and end with the best epoch's weights in any case."""

    def __init__(self, variables, patience: int):
        self.variables, self.patience = variables, patience
        self.best, self.best_weights, self.wait = None, None, 0

    def stop_after(self, epoch: int, value: float) -> bool:
        self.wait += 1
        if self.best is None or value < self.best:
            self.best, self.wait = value, 0
            self.best_weights = [v.numpy() for v in self.variables]
            return False
        return self.wait >= self.patience and epoch > 0

    def restore_best(self) -> None:
        for variable, value in zip(self.variables, self.best_weights):
            variable.assign(value)
