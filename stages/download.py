"""download: fetch the image archive (or copy a folder) into data/raw/<name>/<class>/<image>."""

import shutil

from retrain import paths
from retrain.cache import cache_root
from retrain.download import fetch_dataset
from retrain.errors import exit_on_error
from retrain.params import load_params


def download():
    params = load_params()
    shutil.rmtree(paths.RAW_DIR, ignore_errors=True)
    root = fetch_dataset(params.data.url, params.data.sha256, paths.RAW_DIR, cache_root())
    print(f"images in {root}")


if __name__ == "__main__":
    exit_on_error(download)
