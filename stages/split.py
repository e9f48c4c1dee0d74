"""split: assign every image to train/validation/test by its name's hash; reject what won't decode."""

from pathlib import Path

from retrain import paths
from retrain.errors import RetrainError, exit_on_error
from retrain.params import load_params
from retrain.split import split_dataset


def split():
    params = load_params()
    counts = split_dataset(
        _dataset_root(),
        paths.SPLIT_CSV,
        paths.REJECTED_CSV,
        base_dir=Path.cwd(),
        validation_percentage=params.data.validation_percentage,
        testing_percentage=params.data.testing_percentage,
        min_images_per_class=params.data.min_images_per_class,
        max_image_pixels=params.data.max_image_pixels,
    )
    print(", ".join(f"{n} {name}" for name, n in counts.items()))


def _dataset_root() -> Path:
    """download leaves exactly one folder in data/raw: the dataset, named after the archive."""
    folders = [p for p in sorted(paths.RAW_DIR.iterdir()) if p.is_dir()] if paths.RAW_DIR.is_dir() else []
    if len(folders) != 1:
        raise RetrainError(f"{paths.RAW_DIR}: expected one dataset folder, found {len(folders)}; rerun `dvc repro download`")
    return folders[0]


if __name__ == "__main__":
    exit_on_error(split)
