"""split: assign every image to train/validation/test by its name's hash; reject what won't decode."""

from pathlib import Path

from retrain import paths
from retrain.download import dataset_root
from retrain.errors import exit_on_error
from retrain.params import load_params
from retrain.split import split_dataset


def split():
    params = load_params()
    counts = split_dataset(
        dataset_root(paths.RAW_DIR),
        paths.SPLIT_CSV,
        paths.REJECTED_CSV,
        base_dir=Path.cwd(),
        validation_percentage=params.data.validation_percentage,
        testing_percentage=params.data.testing_percentage,
        min_images_per_class=params.data.min_images_per_class,
        max_image_pixels=params.data.max_image_pixels,
    )
    print(", ".join(f"{n} {name}" for name, n in counts.items()))


if __name__ == "__main__":
    exit_on_error(split)
