"""download: fetch the image archive (or copy a folder) into data/raw/<name>/<class>/<image>."""

from retrain import layouts, paths
from retrain.cache import cache_root
from retrain.download import Limits, fetch_dataset
from retrain.errors import exit_on_error
from retrain.params import load_params
from retrain.records import stage_record


def download():
    params = load_params()
    # fetch_dataset replaces data/raw only once the new dataset is complete, so no rmtree first.
    limits = Limits.of(params.data)
    root = fetch_dataset(params.data.url, params.data.sha256, paths.RAW_DIR, cache_root(), limits=limits)
    if params.data.layout == "oxford102":
        root = layouts.place_oxford_images(root)
    layouts.fetch_extra_files(params.data.extra_files, root, cache_root(), limits=limits)
    with stage_record("download") as record:
        record.set_tags({"download.folder": root})
    print(f"images in {root}")


if __name__ == "__main__":
    exit_on_error(download)
