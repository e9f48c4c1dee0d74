"""The feature cache: computed once per image content, atomic, damage detected."""

import tracemalloc

import numpy as np
import pytest

from imagegen import split_examples
from retrain.backbones import load_backbone
from retrain.errors import RetrainError
from retrain.features import (
    Example,
    FeatureCache,
    compute_features,
    load_split_arrays,
    write_features_npz,
    write_split_arrays,
)


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
    from retrain.images import load_image

    return load_image(path, size)


def test_the_image_pipeline_keeps_order_skips_what_does_not_decode_and_feeds_the_decoders_pixels(tmp_path, examples):
    from retrain.features import image_batches
    from retrain.params import AugmentParams
    from retrain.tf.augment import augmenter

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths = [e.path for e in examples[:2]] + [str(broken)] + [e.path for e in examples[2:4]]
    plain = list(image_batches(paths, (32, 32), 2, extra=[paths]))
    assert [len(images) for images, _ in plain] == [2, 2]  # the broken file is skipped, not fatal
    assert [str(p) for _, keys in plain for p in keys] == [p for p in paths if p != str(broken)]
    first = plain[0][0][0]
    assert first.dtype == np.float32 and first.shape == (32, 32, 3)
    np.testing.assert_array_equal(first, _pixels(paths[0], (32, 32)))  # exactly the one decoder's pixels
    transform = augmenter(AugmentParams(copies=1, crop_area_min=0.3, flip=True, brightness=0.2))
    augmented = list(image_batches(paths[:2], (32, 32), 2, transform, [[1, 2]] * 2))
    again = list(image_batches(paths[:2], (32, 32), 2, transform, [[1, 2]] * 2))
    assert not np.array_equal(augmented[0][0][0], first)
    np.testing.assert_array_equal(augmented[0][0], again[0][0])  # seeded: the same views every time


def test_feature_arrays_stream_to_disk_and_read_back_as_np_savez_wrote_them(tmp_path):
    rows = np.random.default_rng(0).standard_normal((4096, 1280)).astype(np.float32)  # 20 MiB
    labels, names = np.arange(4096, dtype=np.int32) % 5, np.array([f"c/{i}.jpg" for i in range(4096)])
    tracemalloc.start()
    write_features_npz(tmp_path / "train.npz", (row.copy() for row in rows), rows.shape, labels=labels, paths=names)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < rows.nbytes / 10, f"writing held {peak / 2**20:.1f} MiB for a {rows.nbytes / 2**20:.0f} MiB array"
    np.savez(tmp_path / "reference.npz", features=rows, labels=labels, paths=names)
    with np.load(tmp_path / "train.npz") as ours, np.load(tmp_path / "reference.npz") as reference:
        assert list(ours.keys()) == list(reference.keys())
        for key in reference:
            assert ours[key].dtype == reference[key].dtype
            np.testing.assert_array_equal(ours[key], reference[key])
    write_features_npz(tmp_path / "empty.npz", iter(()), (0, 12), labels=np.zeros(0, np.int32))
    assert np.load(tmp_path / "empty.npz")["features"].shape == (0, 12)


def test_a_failed_feature_write_leaves_the_previous_file(tmp_path, examples, tiny_backbone):
    backbone = load_backbone(str(tiny_backbone))
    cache = FeatureCache(tmp_path / "cache", backbone.id, backbone.feature_dim)
    compute_features(examples, backbone, cache, batch_size=8)
    write_split_arrays(examples, cache, tmp_path / "features")
    before = (tmp_path / "features" / "train.npz").read_bytes()
    cache.path(next(e for e in examples if e.split == "train").sha256).unlink()
    with pytest.raises(RetrainError, match="did it change"):
        write_split_arrays(examples, cache, tmp_path / "features")
    assert (tmp_path / "features" / "train.npz").read_bytes() == before
    assert not list((tmp_path / "features").glob(".tmp-*"))
    (tmp_path / "plain").write_text("")  # written arrays get the usual permissions, not a temp file's 0600
    assert (tmp_path / "features" / "train.npz").stat().st_mode == (tmp_path / "plain").stat().st_mode
