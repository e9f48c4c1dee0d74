"""Fine-tuning: only the top blocks change, the result saves and loads as a backbone, and the
opt-in stage runs through `dvc repro` (and costs nothing when off)."""

import json

import numpy as np
import pytest
import tensorflow as tf

from default_params import default_params
from imagegen import make_class_folders, split_examples
from project import every_stage, make_project, ran_stages, run, set_params
from retrain.backbones import load_backbone
from retrain.errors import RetrainError
from retrain.params import AugmentParams, FinetuneParams
from retrain.tf.finetune import finetune, save_backbone, unfrozen_blocks, variable_blocks
from retrain.tf.head_training import build_head

AUGMENT = AugmentParams(copies=0, crop_area_min=0.6, flip=True, brightness=0.1)
FINETUNE = FinetuneParams(enabled=True, blocks=2, epochs=2, learning_rate=0.01, batch_size=4)


def save_blocks_backbone(path, size=32):
    """A SavedModel of three named conv blocks (`block0`, `block1`, `head`) → [N, 8] features."""

    class Blocks(tf.train.Checkpoint):  # like the embedded model: hub's plain `trainable_variables`
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(0)
            shapes = {"block0": (3, 3, 3, 4), "block1": (3, 3, 4, 4), "head": (1, 1, 4, 8)}
            self.kernels = [
                tf.Variable(rng.normal(size=s).astype("float32") * 0.5, name=f"{n}/kernel") for n, s in shapes.items()
            ]
            self.trainable_variables = list(self.kernels)

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        def __call__(self, images):
            x = images
            for kernel in self.kernels:
                x = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME"))
            return tf.reduce_mean(x, axis=[1, 2])

    tf.saved_model.save(Blocks(), str(path))
    return path


@pytest.fixture
def examples(tmp_path):
    return split_examples(tmp_path / "images", ["train", "train", "train", "validation"])


def test_finetuning_changes_only_the_unfrozen_blocks(tmp_path, examples):
    backbone = load_backbone(str(save_blocks_backbone(tmp_path / "blocks")))
    assert [name for name, _ in variable_blocks(backbone)] == ["block0", "block1", "head"]
    before = {v.name: v.numpy() for v in backbone.trainable_variables}
    head = build_head(backbone.feature_dim, 3, default_params().train)
    head_before = head.get_weights()
    history = finetune(backbone, head, examples, AUGMENT, FINETUNE, label_smoothing=0.1, seed=3)
    after = {v.name: v.numpy() for v in backbone.trainable_variables}
    np.testing.assert_array_equal(after["block0/kernel:0"], before["block0/kernel:0"])
    assert not np.array_equal(after["block1/kernel:0"], before["block1/kernel:0"])
    assert not np.array_equal(after["head/kernel:0"], before["head/kernel:0"])
    assert not np.array_equal(head.get_weights()[0], head_before[0])
    assert len(history["val_accuracy"]) == 2 and 0 <= history["best_epoch"] < 2
    # The fine-tuned backbone saves and loads like any SavedModel backbone, with its new weights.
    save_backbone(backbone, tmp_path / "tuned")
    reloaded = load_backbone(str(tmp_path / "tuned"))
    images = tf.random.stateless_uniform([2, 32, 32, 3], seed=[1, 2])
    np.testing.assert_allclose(reloaded.features(images), backbone.features(images), atol=1e-6)
    assert reloaded.id != backbone.id


def test_finetuning_the_embedded_lite0_changes_only_its_top_blocks(examples):
    """The real backbone users fine-tune: one short step, and only the unfrozen blocks move."""
    backbone = load_backbone("efficientnet_lite0")
    blocks = variable_blocks(backbone)
    assert len(blocks) > 3 and blocks[-1][0] != blocks[0][0]
    before = {v.name: v.numpy() for v in backbone.trainable_variables}
    head = build_head(backbone.feature_dim, 3, default_params().train)
    one_step = FinetuneParams(enabled=True, blocks=2, epochs=1, learning_rate=0.01, batch_size=4)
    finetune(backbone, head, examples, AUGMENT, one_step, label_smoothing=0.1, seed=3)
    for _name, variables in blocks[:-2]:  # frozen: bit for bit the same
        for v in variables:
            np.testing.assert_array_equal(v.numpy(), before[v.name], err_msg=v.name)
    for name, variables in blocks[-2:]:  # unfrozen: moved by the step
        assert any(not np.array_equal(v.numpy(), before[v.name]) for v in variables), name


def test_a_backbone_without_trainable_variables_is_refused(tmp_path):
    class Frozen(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
        def __call__(self, images):
            return tf.reduce_mean(images, axis=[1, 2])

    tf.saved_model.save(Frozen(), str(tmp_path / "frozen"))
    with pytest.raises(RetrainError, match="exposes no trainable variables.*finetune.enabled: false"):
        unfrozen_blocks(load_backbone(str(tmp_path / "frozen")), 1)


def test_more_blocks_than_the_backbone_has_is_refused(tmp_path):
    backbone = load_backbone(str(save_blocks_backbone(tmp_path / "blocks")))
    with pytest.raises(RetrainError, match="finetune.blocks is 5 but .* has only 3 blocks"):
        unfrozen_blocks(backbone, 5)


@pytest.mark.slow
def test_repro_with_finetuning_on_and_off(tmp_path):
    images = tmp_path / "flowers"
    make_class_folders(images, {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 230)}, per_class=10)
    (tmp_path / "project").mkdir()
    root = make_project(tmp_path / "project", str(images), None, save_blocks_backbone(tmp_path / "blocks"))
    set_params(root, **{"augment.copies": 2})
    first = run(root, "dvc", "repro")
    assert ran_stages(first) == every_stage(root)  # in dvc.yaml's order
    assert json.loads((root / "data/finetune/finetune.json").read_text())["enabled"] is False
    stats = json.loads((root / "data/bottlenecks.json").read_text())
    assert stats["augmented_computed"] == 2 * stats["train_images"]
    frozen_metrics = (root / "data/evaluate/metrics.json").read_text()

    set_params(root, **{"finetune.enabled": True, "finetune.blocks": 1, "finetune.epochs": 1, "finetune.batch_size": 8})
    tuned = run(root, "dvc", "repro")
    assert ran_stages(tuned) == ["finetune", "evaluate", "export", "log"]  # features and head are reused
    summary = json.loads((root / "data/finetune/finetune.json").read_text())
    assert summary["enabled"] and len(summary["val_accuracy"]) == 1
    assert (root / "data/finetune/backbone/saved_model.pb").is_file()
    assert (root / "model/saved_model/saved_model.pb").is_file()  # export checked it reproduces evaluate

    set_params(root, **{"finetune.enabled": False})
    run(root, "dvc", "repro")
    assert json.loads((root / "data/finetune/finetune.json").read_text())["enabled"] is False
    assert (root / "data/evaluate/metrics.json").read_text() == frozen_metrics
