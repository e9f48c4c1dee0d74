"""Augmented views of the training images, computed once and cached like any feature.

`augment.copies` views per TRAINING image: a random crop (at least `crop_area_min` of the image,
aspect 3:4 to 4:3), a left-right flip and a brightness shift, applied to the decoded image before
it is resized (`retrain.images`), so a crop keeps the photo's full resolution. Every random op is
a stateless TF op (`retrain.tf.augment`, loaded only when a view must be computed) seeded by (global seed, image sha256, view index): the same params give the same
pixels on every run and machine, so each view's feature vector is a cache entry like an original's,
keyed `<image sha256>-<params digest>-<view>` in the same `FeatureCache`. Validation and test
images are never augmented: `views_of` keeps only the train split.
"""

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from retrain.errors import RetrainError
from retrain.features import (
    Example,
    FeatureCache,
    cached_vector,
    class_names,
    fill_missing,
    write_features_npz,
)
from retrain.params import AugmentParams

# Bump when `retrain.tf.augment.augment_image` computes different pixels for the same params and seeds.
AUGMENT_VERSION = "1"


def params_digest(params: AugmentParams, seed: int) -> str:
    """12 hex digits naming the augmentation: its amounts, the seed and `AUGMENT_VERSION`."""
    amounts = {k: v for k, v in params.model_dump().items() if k != "copies"}  # more copies: same views
    text = json.dumps({"v": AUGMENT_VERSION, "seed": seed, **amounts}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def view_seed(seed: int, sha256: str, view: int | str) -> tuple[int, int]:
    """The stateless-op seed of one view: a pair of int32s from (seed, image content, view)."""
    digest = hashlib.sha256(f"{seed}|{sha256}|{view}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1, int.from_bytes(digest[4:8], "little") >> 1


def views_of(examples: list[Example], params: AugmentParams, seed: int) -> list[tuple[Example, int, str]]:
    """(example, view index, cache key) for every view of every TRAINING example, in file order."""
    digest = params_digest(params, seed)
    return [(e, i, f"{e.sha256}-{digest}-{i}") for e in examples if e.split == "train" for i in range(params.copies)]


@dataclass(frozen=True)
class Augmentation:
    """The views' transform for `image_batches`: (uint8 [H, W, 3] image, int32 [2] seed) → uint8 image.

    A plain value (the Ray engine sends it to its actors) that reaches TensorFlow's random ops
    (`retrain.tf.augment`) only when a view is computed: a run with every view cached loads no
    TensorFlow.
    """

    params: AugmentParams

    def __call__(self, image: np.ndarray, seed) -> np.ndarray:
        from retrain.tf.augment import augmenter

        return augmenter(self.params)(image, seed)


def compute_views(
    examples, backbone, cache: FeatureCache, params: AugmentParams, seed: int, batch_size: int, engine=None
) -> dict:
    """Fill the cache with the features of every training view it lacks, on `engine` (see
    `features.fill_missing`); return counts.

    Each key is computed once, however many rows share an image's content.
    """
    entries = ((key, e.path, view_seed(seed, e.sha256, view)) for e, view, key in views_of(examples, params, seed))
    run = fill_missing(entries, backbone, cache, batch_size, Augmentation(params), engine, "augmented views")
    return {
        "augmented_views": run["entries"],
        "augmented_cache_hits": run["cache_hits"],
        "augmented_computed": run["computed"],
        "augmented_seconds": run["seconds"],
    }


def write_views_array(examples, cache: FeatureCache, params: AugmentParams, seed: int, out_path) -> int:
    """Write out_path (.npz: features float32 [V, D], labels int32 [V], paths, views int32 [V])."""
    index = {name: i for i, name in enumerate(class_names(examples))}
    rows = views_of(examples, params, seed)
    error = "{}: an augmented view could not be computed; did the file change? rerun `dvc repro`"
    write_features_npz(
        out_path,
        (cached_vector(cache, key, error.format(example.path)) for example, _, key in rows),
        (len(rows), cache.feature_dim),
        labels=np.array([index[e.label] for e, _, _ in rows], dtype=np.int32),
        paths=np.array([e.path for e, _, _ in rows], dtype=str),
        views=np.array([view for _, view, _ in rows], dtype=np.int32),
    )
    return len(rows)


def load_views_array(path) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 [V, D], labels int32 [V]) of the training views; empty when absent."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["features"], data["labels"]
    except FileNotFoundError:
        raise RetrainError(f"{path}: not found; run the bottlenecks stage first (dvc repro bottlenecks)") from None
