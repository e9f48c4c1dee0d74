"""split: assign every image to train/validation/test by its name's hash (or the dataset's official
split), keep identical files in one split, reject what won't decode."""

from pathlib import Path

from retrain import paths
from retrain.download import dataset_root
from retrain.errors import exit_on_error
from retrain.params import load_params
from retrain.records import stage_record
from retrain.split import split_dataset


def split():
    params = load_params()
    counts = split_dataset(
        dataset_root(paths.RAW_DIR),
        paths.SPLIT_CSV,
        paths.REJECTED_CSV,
        duplicates_csv=paths.DUPLICATES_CSV,
        layout=params.data.layout,
        labels=params.data.labels,
        split=params.data.split,
        base_dir=Path.cwd(),
        validation_percentage=params.data.validation_percentage,
        testing_percentage=params.data.testing_percentage,
        min_images_per_class=params.data.min_images_per_class,
        max_image_pixels=params.data.max_image_pixels,
        exclude=Path(params.data.exclude) if params.data.exclude else None,
        near_duplicate_distance=params.data.near_duplicate_distance,
        near_duplicates_csv=paths.NEAR_DUPLICATES_CSV,
    )
    with stage_record("split") as record:  # the log stage records split.csv as the run's dataset inputs
        record.set_tags({f"split.{name}": n for name, n in counts.items()})
    print(", ".join(f"{n} {name.replace('_', ' ')}" for name, n in counts.items()))


if __name__ == "__main__":
    exit_on_error(split)
