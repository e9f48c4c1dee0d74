"""Fine-tuning: the backbone's top blocks and the trained head, trained together on images.

Opt-in (`finetune.enabled`). The backbone's trainable variables are grouped into blocks by the
first part of their names (EfficientNet-Lite0: `stem`, `block0` … `block15`, `head` — the final
1x1 conv); the top `finetune.blocks` groups are unfrozen, everything below stays as it was. Batch
norm needs no special care: the embedded EfficientNet-Lite0 folds it into the conv kernels and
biases at conversion, so there are no batch statistics to update or freeze (inference mode is all
there is). Training starts from the head the train stage fitted, on freshly augmented views of
the training images (`retrain.augment`, new seeds every epoch), at a low learning rate with cosine
decay, and keeps the epoch with the best validation loss. The fine-tuned backbone is saved as a
SavedModel that `load_backbone` reads like any other; the validation and test features it gives
are written beside it so that evaluate and export judge the fine-tuned model. Runs wherever
TensorFlow places it: the CPU here, a GPU where one exists.
"""

import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from retrain.atomic import atomic_dir
from retrain.augment import view_seed
from retrain.errors import RetrainError
from retrain.evaluation import cross_entropy
from retrain.features import Example, class_names, image_batches, write_features_npz
from retrain.params import AugmentParams, FinetuneParams
from retrain.tf.augment import augmenter
from retrain.tf.head_training import head_logits, set_seed, smoothed_cross_entropy


def variable_blocks(backbone) -> list[tuple[str, list]]:
    """The backbone's trainable variables as (block name, variables), from input to output.

    A block is the first part of a variable name (`block3/expand/kernel:0` → `block3`), in the
    order the module lists its trainable variables (TF Hub convention: input to output).
    """
    blocks: dict[str, list] = {}
    for variable in backbone.trainable_variables:
        blocks.setdefault(variable.name.split("/")[0].split(":")[0], []).append(variable)
    return list(blocks.items())


def unfrozen_blocks(backbone, count: int) -> list[tuple[str, list]]:
    """The top `count` blocks; one-line RetrainError when the backbone cannot be fine-tuned."""
    blocks = variable_blocks(backbone)
    if not blocks:
        raise RetrainError(
            f"backbone {backbone.name!r} exposes no trainable variables, so it cannot be "
            "fine-tuned; set finetune.enabled: false or use backbone.name: efficientnet_lite0"
        )
    if count > len(blocks):
        raise RetrainError(
            f"finetune.blocks is {count} but backbone {backbone.name!r} has only {len(blocks)} "
            f"blocks ({blocks[0][0]} … {blocks[-1][0]}); lower finetune.blocks"
        )
    return blocks[-count:]


def finetune(
    backbone,
    head: keras.Model,
    examples: list[Example],
    augment: AugmentParams,
    params: FinetuneParams,
    label_smoothing: float,
    seed: int,
) -> dict:
    """Train the top `params.blocks` blocks and the head in place; return per-epoch history.

    examples: all rows of split.csv (train rows are trained on, validation rows pick the epoch).
    The backbone's module and the head end with the weights of the best validation loss.
    """
    set_seed(seed)
    index = {name: i for i, name in enumerate(class_names(examples))}
    train = [e for e in examples if e.split == "train"]
    validation = [e for e in examples if e.split == "validation"]
    # Keras 3 variables hold a tf.Variable in `.value`; the tape watches only what is trained.
    variables = [v for _, block in unfrozen_blocks(backbone, params.blocks) for v in block] + head.trainable_variables
    watched = [v if isinstance(v, tf.Variable) else v.value for v in variables]
    steps = params.epochs * -(-len(train) // params.batch_size)
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(params.learning_rate, max(1, steps)))
    num_classes = len(index)
    rate = next(layer.rate for layer in head.layers if isinstance(layer, keras.layers.Dropout))
    dropout = (lambda x: tf.nn.dropout(x, rate)) if rate else None

    @tf.function(reduce_retracing=True)
    def train_step(images, labels):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(watched)
            logits = head_logits(head, backbone.features(images), dropout)
            loss = tf.reduce_mean(smoothed_cross_entropy(logits, labels, num_classes, label_smoothing))
        optimizer.apply_gradients(zip(tape.gradient(loss, watched), variables))
        return loss

    features = tf.function(backbone.features, reduce_retracing=True)
    history = {"loss": [], "val_loss": [], "val_accuracy": [], "epoch_seconds": []}
    best, best_loss = _snapshot(variables), np.inf
    transform = augmenter(augment) if augment is not None else None  # one for every epoch: seeds vary the views
    for epoch in range(params.epochs):
        started = time.perf_counter()
        order = np.random.default_rng([seed, epoch]).permutation(len(train))
        rows = [train[i] for i in order]
        seeds = [view_seed(seed, e.sha256, f"finetune-{epoch}") for e in rows]
        labels = np.array([index[e.label] for e in rows], np.int32)
        dataset = image_batches(
            [e.path for e in rows], backbone.image_size, params.batch_size, transform, seeds, [labels]
        )
        with tqdm(total=len(rows), unit="img", desc=f"finetune epoch {epoch + 1}", mininterval=5.0) as bar:
            losses = []
            for images, batch_labels in dataset:
                losses.append(float(train_step(tf.constant(images), tf.constant(batch_labels))))
                bar.update(len(batch_labels))
        val_loss, val_accuracy = _validate(features, head, validation, index, backbone.image_size, params.batch_size)
        for key, value in zip(history, (np.mean(losses), val_loss, val_accuracy, time.perf_counter() - started)):
            history[key].append(float(value))
        print(
            f"finetune epoch {epoch + 1}/{params.epochs}: loss {history['loss'][-1]:.4f} "
            f"val_loss {val_loss:.4f} val_accuracy {val_accuracy:.4f} ({history['epoch_seconds'][-1]:.0f} s)",
            flush=True,
        )
        if val_loss < best_loss or not validation:
            best, best_loss = _snapshot(variables), val_loss
    for variable, value in zip(variables, best):
        variable.assign(value)
    history["best_epoch"] = int(np.argmin(history["val_loss"])) if validation else params.epochs - 1
    return history


def _snapshot(variables) -> list[np.ndarray]:
    return [v.numpy() for v in variables]


def _validate(features, head, rows, index, image_size, batch_size) -> tuple[float, float]:
    """(plain cross-entropy as `evaluation.cross_entropy`, accuracy) of the un-augmented validation images."""
    if not rows:
        return float("nan"), float("nan")
    vectors, labels = split_features(features, rows, index, image_size, batch_size)
    logits = head_logits(head, tf.constant(vectors)).numpy()
    return cross_entropy(labels, logits=logits), float(np.mean(logits.argmax(1) == labels))


def split_features(features, rows: list[Example], index, image_size, batch_size) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [N, D] features, int32 [N] labels) of rows' images, decoded as bottlenecks does."""
    labels = np.array([index[e.label] for e in rows], np.int32)
    batches = [
        features(tf.constant(images)).numpy()
        for (images,) in image_batches([e.path for e in rows], image_size, batch_size)
    ]
    vectors = np.concatenate(batches) if batches else np.zeros((0, 0), np.float32)
    if len(vectors) != len(rows):
        raise RetrainError(
            f"{len(rows) - len(vectors)} images could not be decoded now though split accepted "
            "them; did they change? rerun `dvc repro`"
        )
    return vectors, labels


def write_split_features(backbone, examples: list[Example], out_dir: Path, batch_size: int) -> None:
    """out_dir/<split>.npz for validation and test, with the fine-tuned backbone (as write_split_arrays)."""
    index = {name: i for i, name in enumerate(class_names(examples))}
    features = tf.function(backbone.features, reduce_retracing=True)
    for split in ("validation", "test"):
        rows = [e for e in examples if e.split == split]
        vectors, labels = split_features(features, rows, index, backbone.image_size, batch_size)
        write_features_npz(
            out_dir / f"{split}.npz",
            vectors,
            vectors.shape,
            labels=labels,
            paths=np.array([e.path for e in rows], dtype=str),
        )


def save_backbone(backbone, path: Path) -> None:
    """Save the (fine-tuned) backbone module as a SavedModel, atomically; load it with load_backbone."""
    with atomic_dir(path) as temp:
        tf.saved_model.save(
            backbone.module, str(temp), signatures=dict(getattr(backbone.module, "signatures", {})) or None
        )
