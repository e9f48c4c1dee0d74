"""Feature extraction on XNNPACK: the same features as TensorFlow, its own cache id, a fallback."""

import numpy as np
import pytest
import tensorflow as tf

from imagegen import split_examples
from retrain.backbones import load_backbone, xnnpack
from retrain.features import FeatureCache, compute_features, image_batches


@pytest.fixture(scope="module")
def lite0():
    """The real embedded EfficientNet-Lite0 on both runtimes (conversion cached in RETRAIN_CACHE_DIR)."""
    return load_backbone("efficientnet_lite0"), load_backbone("efficientnet_lite0", runtime="xnnpack")


def test_xnnpack_features_match_tensorflows_on_generated_photos(tmp_path, lite0):
    on_tf, on_xnnpack = lite0
    assert on_xnnpack.runtime == "xnnpack" and on_tf.runtime == "tensorflow"
    examples = split_examples(tmp_path / "images", ["train", "test"], size=(300, 200))
    ((images, *_),) = image_batches([e.path for e in examples], on_tf.image_size, len(examples))
    ours, theirs = on_xnnpack.extract(images), on_tf.features(images).numpy()
    assert ours.shape == theirs.shape == (len(examples), 1280)
    assert np.max(np.abs(ours - theirs)) <= 1e-4
    assert np.std(theirs) > 0.1  # real features, not zeros that would match anything


def test_the_runtime_is_part_of_the_backbone_id_and_the_conversion_is_cached(lite0):
    on_tf, on_xnnpack = lite0
    assert on_xnnpack.weights_id == on_tf.id != on_xnnpack.id  # features differ at 1e-5: another cache
    converted = xnnpack.tflite_path(on_tf.id)
    before = converted.stat().st_mtime_ns
    again = load_backbone("efficientnet_lite0", runtime="xnnpack")
    assert again.id == on_xnnpack.id and converted.stat().st_mtime_ns == before  # not converted again


def test_the_stage_path_fills_the_cache_from_xnnpack(tmp_path, tiny_backbone):
    backbone = load_backbone(str(tiny_backbone), runtime="xnnpack")
    assert backbone.runtime == "xnnpack"  # a hub-style SavedModel converts too, not only the embedded one
    examples = split_examples(tmp_path / "images", ["train", "validation", "test"])
    cache = FeatureCache(tmp_path / "cache", backbone.id, backbone.feature_dim)
    assert compute_features(examples, backbone, cache, batch_size=5)["computed"] == len(examples)
    ((images, *_),) = image_batches([examples[0].path], backbone.image_size, 1)
    np.testing.assert_allclose(cache.get(examples[0].sha256), backbone.features(images).numpy()[0], atol=1e-4)
    assert compute_features(examples, backbone, cache, batch_size=5)["computed"] == 0


def _save_unconvertible(path):
    """A feature-vector SavedModel whose graph holds string ops, which TFLite's built-ins lack."""

    class Stringly(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32)])
        def __call__(self, images):
            mean = tf.reduce_mean(images, axis=[1, 2])
            return tf.strings.to_number(tf.strings.as_string(mean, precision=6))

    tf.saved_model.save(Stringly(), str(path))
    return path


def test_a_module_that_does_not_convert_falls_back_to_tensorflow_with_one_line(tmp_path, capsys):
    folder = _save_unconvertible(tmp_path / "stringly")
    backbone = load_backbone(str(folder), runtime="xnnpack")
    said = capsys.readouterr().err.strip().splitlines()
    assert backbone.runtime == "tensorflow" and backbone.id == backbone.weights_id
    assert len(said) == 1 and "no XNNPACK conversion" in said[0] and "SavedModel" in said[0]
    images = np.full((2, 16, 16, 3), 0.25, np.float32)
    np.testing.assert_allclose(backbone.extract(images), np.full((2, 3), 0.25), atol=1e-6)
    again = load_backbone(str(folder), runtime="xnnpack")  # the failure is remembered: no second try
    assert again.runtime == "tensorflow" and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_known_module_starts_without_restoring_it_and_a_changed_one_is_checked_again(tmp_path):
    from conftest import save_tiny_backbone

    folder = save_tiny_backbone(tmp_path / "tiny")
    first = load_backbone(str(folder), runtime="xnnpack")
    again = load_backbone(str(folder), runtime="xnnpack")  # from the memo: validation, id, restore skipped
    assert again._module is None and (again.id, again.image_size, again.feature_dim) == (
        first.id,
        first.image_size,
        first.feature_dim,
    )
    images = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(again.features(images).numpy(), first.features(images).numpy())  # restored when used
    save_tiny_backbone(folder, size=24)  # the same folder, another module
    changed = load_backbone(str(folder))
    assert changed.image_size == (24, 24) and changed.weights_id != first.weights_id
