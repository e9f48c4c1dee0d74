"""The feature cache: computed once per image content, atomic, damage detected."""

import numpy as np
import pytest

from imagegen import split_examples
from retrain.backbones import load_backbone
from retrain.features import Example, FeatureCache, compute_features, load_split_arrays, write_split_arrays


@pytest.fixture
def examples(tmp_path):
    return split_examples(tmp_path / "images", ["train", "train", "validation", "test"])


def test_features_are_computed_once_then_read_from_cache(tmp_path, examples, tiny_backbone):
    backbone = load_backbone(str(tiny_backbone))
    cache = FeatureCache(tmp_path / "cache", backbone.id, backbone.feature_dim)
    first = compute_features(examples, backbone, cache, batch_size=5)
    assert first["computed"] == 12 and first["cache_hits"] == 0
    second = compute_features(examples, backbone, cache, batch_size=5)
    assert second["computed"] == 0 and second["cache_hits"] == 12
    counts = write_split_arrays(examples, cache, tmp_path / "features")
    assert counts == {"train": 6, "validation": 3, "test": 3}
    features, labels, paths = load_split_arrays(tmp_path / "features", "train")
    assert features.shape == (6, 12) and features.dtype == np.float32
    assert sorted(set(labels.tolist())) == [0, 1, 2]
    direct = backbone.features(np.stack([_pixels(paths[0], backbone.image_size)])).numpy()[0]
    np.testing.assert_allclose(features[0], direct, atol=1e-5)


def test_a_damaged_entry_is_recomputed(tmp_path, examples, tiny_backbone):
    backbone = load_backbone(str(tiny_backbone))
    cache = FeatureCache(tmp_path / "cache", backbone.id, backbone.feature_dim)
    compute_features(examples, backbone, cache, batch_size=8)
    cache.path(examples[0].sha256).write_bytes(b"\x93NUMPY half")
    assert cache.get(examples[0].sha256) is None
    again = compute_features(examples, backbone, cache, batch_size=8)
    assert again["computed"] == 1
    assert not list(cache.folder.rglob(".tmp-*"))


def test_identical_images_are_computed_once(tmp_path, examples, tiny_backbone):
    backbone = load_backbone(str(tiny_backbone))
    cache = FeatureCache(tmp_path / "cache", backbone.id, backbone.feature_dim)
    duplicated = examples + [Example(examples[0].path, examples[0].label, "test", examples[0].sha256)]
    assert compute_features(duplicated, backbone, cache, batch_size=8)["computed"] == 12


def _pixels(path, size):
    import tensorflow as tf

    from retrain.images import decode_image, resize_image

    return resize_image(decode_image(tf.io.read_file(path)), size).numpy()


def test_image_pipelines_run_without_the_autotuner(tmp_path, examples):
    # With tf.data's autotuner on, deleting a finished iterator stalled the caller 2-5 s in 8 of
    # 20 runs (see retrain.features.batched); both image pipelines must keep it off.
    from retrain.augment import image_dataset
    from retrain.features import _image_dataset

    paths = [e.path for e in examples[:4]]
    for dataset in (_image_dataset(paths, [e.sha256 for e in examples[:4]], (32, 32), 2),
                    image_dataset(paths, (32, 32), 2)):
        assert dataset.options().autotune.enabled is False
        assert sum(len(batch[0]) for batch in dataset) == 4
