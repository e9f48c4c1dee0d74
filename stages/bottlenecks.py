"""bottlenecks: backbone features for every image in split.csv, cached per image content."""

import json

from retrain import paths
from retrain.augment import write_views_array
from retrain.backbones import load_backbone
from retrain.cache import cache_root
from retrain.errors import exit_on_error
from retrain.features import FeatureCache, dataset_hash, read_split, write_split_arrays
from retrain.params import load_params
from retrain.ray_engine import feature_engine
from retrain.records import stage_record


def bottlenecks():
    params = load_params()
    examples = read_split(paths.SPLIT_CSV)
    size = params.backbone.image_size
    # XNNPACK where the backbone converts (its features match TensorFlow's within 1e-4), else TF.
    backbone = load_backbone(params.backbone.name, image_size=(size, size) if size else None, runtime="xnnpack")
    cache = FeatureCache(cache_root() / "features", backbone.id, backbone.feature_dim)
    compute_features, compute_views = feature_engine(params.bottlenecks)  # local or ray, same signatures
    stats = compute_features(examples, backbone, cache, params.bottlenecks.batch_size)
    counts = write_split_arrays(examples, cache, paths.FEATURES_DIR)
    # Augmented views of the train split only; validation and test stay the photos as they are.
    stats.update(compute_views(examples, backbone, cache, params.augment, params.seed, params.bottlenecks.batch_size))
    write_views_array(examples, cache, params.augment, params.seed, paths.TRAIN_AUGMENTED)
    meta = {"backbone": backbone.name, "backbone_id": backbone.id, "dataset_hash": dataset_hash(examples)}
    (paths.FEATURES_DIR / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    stats.update({f"{split}_images": n for split, n in counts.items()})
    paths.BOTTLENECKS_STATS.write_text(json.dumps(stats, indent=2) + "\n")
    with stage_record("bottlenecks") as record:  # bookkeeping, not model metrics: tags
        record.set_tags(
            {
                "backbone_id": backbone.id,
                "dataset_hash": meta["dataset_hash"],
                **{f"bottlenecks.{key}": value for key, value in stats.items()},
            }
        )
    print(
        f"{stats['computed']} computed, {stats['cache_hits']} from cache, {stats['images_per_second']} images/s; "
        f"augmented views: {stats['augmented_computed']} computed, {stats['augmented_cache_hits']} from cache"
    )


if __name__ == "__main__":
    exit_on_error(bottlenecks)
