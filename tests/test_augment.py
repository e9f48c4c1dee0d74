"""Augmented training views: reproducible, cached like any feature, never in validation or test."""

import numpy as np
import pytest
import tensorflow as tf

from imagegen import split_examples
from retrain.augment import compute_views, params_digest, view_seed, write_views_array
from retrain.backbones import load_backbone
from retrain.features import FeatureCache, compute_features, load_split_arrays, write_split_arrays
from retrain.params import AugmentParams
from retrain.tf.augment import augment_image

AUGMENT = AugmentParams(copies=3, crop_area_min=0.4, flip=True, brightness=0.3)


@pytest.fixture
def examples(tmp_path):
    return split_examples(tmp_path / "images", ["train", "train", "validation", "test"], size=(48, 40))


@pytest.fixture
def backbone(tiny_backbone):
    return load_backbone(str(tiny_backbone))


def test_views_are_computed_once_then_read_from_cache(tmp_path, examples, backbone):
    cache = FeatureCache(tmp_path / "cache", backbone.id, backbone.feature_dim)
    first = compute_views(examples, backbone, cache, AUGMENT, seed=7, batch_size=4)
    assert first["augmented_computed"] == 6 * 3 and first["augmented_cache_hits"] == 0
    second = compute_views(examples, backbone, cache, AUGMENT, seed=7, batch_size=4)
    assert second["augmented_computed"] == 0 and second["augmented_cache_hits"] == 18
    # One more copy computes only the new view of each image.
    more = compute_views(examples, backbone, cache, AUGMENT.model_copy(update={"copies": 4}), seed=7, batch_size=4)
    assert more["augmented_computed"] == 6 and more["augmented_cache_hits"] == 18
    # Other amounts or another seed are other views.
    stronger = AUGMENT.model_copy(update={"brightness": 0.5})
    assert params_digest(stronger, 7) != params_digest(AUGMENT, 7) != params_digest(AUGMENT, 8)
    assert compute_views(examples, backbone, cache, stronger, seed=7, batch_size=4)["augmented_computed"] == 18


def test_views_are_reproducible_and_differ_from_the_photo(tmp_path, examples, backbone):
    arrays = []
    for run in ("a", "b"):
        cache = FeatureCache(tmp_path / run, backbone.id, backbone.feature_dim)
        compute_views(examples, backbone, cache, AUGMENT, seed=7, batch_size=5)
        write_views_array(examples, cache, AUGMENT, 7, tmp_path / f"{run}.npz")
        arrays.append(np.load(tmp_path / f"{run}.npz")["features"])
    np.testing.assert_array_equal(arrays[0], arrays[1])  # bit for bit, whatever the batch size
    compute_features(examples, backbone, cache, batch_size=4)
    originals = write_split_arrays(examples, cache, tmp_path / "features")
    x_train, _, _ = load_split_arrays(tmp_path / "features", "train")
    assert originals["train"] == 6
    views = arrays[0].reshape(6, 3, -1)  # rows: train image, then view
    assert not np.allclose(views, x_train[:, None, :], atol=1e-4)
    assert not np.allclose(views[:, 0], views[:, 1], atol=1e-4)


def test_validation_and_test_never_get_augmented_views(tmp_path, examples, backbone):
    cache = FeatureCache(tmp_path / "cache", backbone.id, backbone.feature_dim)
    compute_features(examples, backbone, cache, batch_size=4)
    compute_views(examples, backbone, cache, AUGMENT, seed=7, batch_size=4)
    write_split_arrays(examples, cache, tmp_path / "features")
    write_views_array(examples, cache, AUGMENT, 7, tmp_path / "features" / "train_augmented.npz")
    with np.load(tmp_path / "features" / "train_augmented.npz") as views:
        assert set(views["paths"]) == {e.path for e in examples if e.split == "train"}
        assert len(views["features"]) == 18 and list(views["views"][:3]) == [0, 1, 2]
    for split in ("validation", "test"):
        features, _, split_paths = load_split_arrays(tmp_path / "features", split)
        assert split_paths == [e.path for e in examples if e.split == split]
        np.testing.assert_array_equal(features, np.stack([cache.get(e.sha256) for e in examples if e.split == split]))
    # Only train images' views are in the cache.
    cached = {p.stem.split("-")[0] for p in cache.folder.rglob("*-*.npy")}
    assert cached == {e.sha256 for e in examples if e.split == "train"}


def test_a_view_keeps_at_least_the_minimum_crop_area():
    image = tf.zeros([100, 80, 3], tf.uint8)
    for view in range(10):
        crop = augment_image(image, view_seed(1, "ab" * 32, view), AUGMENT)
        height, width, channels = crop.shape
        assert channels == 3 and height * width >= 0.4 * 100 * 80 * 0.95
