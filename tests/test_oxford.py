"""Oxford 102 Flowers in the layout its authors publish, served on loopback: download, split, repro.

The dataset is generated in exactly that layout: `102flowers.tgz` (top folder `jpg/`,
image_00001.jpg …), `imagelabels.mat` and `setid.mat` written by scipy.io.savemat (1xN matrices
of 1-based numbers, as in the real files), and a `label_map.json` names file.
"""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from imagegen import image_bytes, make_tgz
from project import make_project, run, serve_folder, set_params
from retrain import layouts
from retrain.download import fetch_dataset, file_sha256
from retrain.errors import RetrainError
from retrain.params import ExtraFile
from retrain.split import split_dataset

COLOURS = {1: (230, 20, 20), 2: (20, 200, 40), 3: (30, 40, 230)}
NAMES = {"1": "pink primrose", "2": "hard-leaved pocket orchid", "3": "canterbury bells"}
COUNT = 30
OFFICIAL = {"trnid": range(1, 13), "valid": range(13, 19), "tstid": range(19, 30)}  # image 30: in no set
SAME_AS = {27: 3}  # image 27 (official test) has image 3's bytes (official train)


def _label(number: int) -> int:
    return (number - 1) % 3 + 1


def _image(number: int) -> bytes:
    source = SAME_AS.get(number, number)
    return image_bytes("JPEG", COLOURS[_label(source)], (48, 48), seed=source)


def _savemat(path: Path, **vectors) -> Path:
    # Real Oxford files hold 1xN matrices (uint8 labels, uint16 ids): keep those shapes and types.
    scipy.io.savemat(path, {key: np.array([list(v)], dtype=dtype) for key, (v, dtype) in vectors.items()})
    return path


def make_oxford_files(folder: Path) -> dict[str, str]:
    """Write 102flowers.tgz, imagelabels.mat, setid.mat, label_map.json in folder; {name: sha256}."""
    jpg = folder / "build" / "jpg"
    jpg.mkdir(parents=True)
    for number in range(1, COUNT + 1):
        (jpg / f"image_{number:05d}.jpg").write_bytes(_image(number))
    make_tgz(jpg, folder / "102flowers.tgz", arcname="jpg")
    _savemat(folder / "imagelabels.mat", labels=([_label(n) for n in range(1, COUNT + 1)], np.uint8))
    _savemat(folder / "setid.mat", **{key: (ids, np.uint16) for key, ids in OFFICIAL.items()})
    (folder / "label_map.json").write_text(json.dumps(NAMES))
    names = ("102flowers.tgz", "imagelabels.mat", "setid.mat", "label_map.json")
    return {name: file_sha256(folder / name) for name in names}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, {file name: sha256}) of the Oxford files on a loopback HTTP server."""
    folder = tmp_path_factory.mktemp("oxford-served")
    digests = make_oxford_files(folder)
    with serve_folder(folder) as url:
        yield url, digests


def _fetch(url: str, digests: dict, tmp: Path, extras=("imagelabels.mat", "setid.mat")) -> Path:
    """What the download stage does, on the library: archive, nest jpg/, the extra files."""
    root = fetch_dataset(f"{url}/102flowers.tgz", digests["102flowers.tgz"], tmp / "raw", tmp / "cache")
    root = layouts.place_oxford_images(root)
    layouts.fetch_extra_files([ExtraFile(url=f"{url}/{n}", sha256=digests[n]) for n in extras], root, tmp / "cache")
    return root


def _split_rows(root: Path, out: Path, split: str) -> tuple[dict, dict, dict]:
    counts = split_dataset(
        root,
        out / "split.csv",
        out / "rejected.csv",
        base_dir=root,
        layout="oxford102",
        split=split,
        validation_percentage=20,
        testing_percentage=20,
        min_images_per_class=2,
    )
    with open(out / "split.csv", newline="") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    with open(out / "rejected.csv", newline="") as f:
        rejected = {r["path"]: r["reason"] for r in csv.DictReader(f)}
    return counts, rows, rejected


def test_the_official_layout_downloads_and_splits_by_setid(served, tmp_path):
    url, digests = served
    root = _fetch(url, digests, tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["imagelabels.mat", "jpg", "setid.mat"]
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["oxford102"]
    (root / "jpg" / "notes.txt").write_text("not an image")
    counts, rows, rejected = _split_rows(root, tmp_path, "official")
    official = {n: split for key, split in layouts.OXFORD_SPLIT_KEYS.items() for n in OFFICIAL[key]}
    for number in range(1, COUNT):
        row = rows[f"jpg/image_{number:05d}.jpg"]
        assert row["label"] == f"class_{_label(number):03d}"
        # image 27 is image 3's twin: it follows its first copy into train, out of test
        assert row["split"] == ("train" if number == 27 else official[number])
    assert rejected == {
        "jpg/image_00030.jpg": "in no set of the official split (data.split: official), skipped",
        "jpg/notes.txt": "not listed in imagelabels.mat, skipped",
    }
    assert (counts["train"], counts["validation"], counts["test"]) == (13, 6, 10)
    assert (counts["duplicates"], counts["duplicates_moved"]) == (1, 1)


def test_the_names_file_names_the_classes_and_hash_ignores_setid(served, tmp_path):
    url, digests = served
    root = _fetch(url, digests, tmp_path, extras=("imagelabels.mat", "label_map.json"))
    _, rows, rejected = _split_rows(root, tmp_path, "hash")
    assert len(rows) == COUNT and rejected == {}  # no setid.mat needed: the hash rule splits
    assert {r["label"] for r in rows.values()} == set(NAMES.values())
    assert rows["jpg/image_00002.jpg"]["label"] == "hard-leaved pocket orchid"


def test_a_checksum_mismatch_names_the_file_both_digests_and_the_key(served, tmp_path):
    url, digests = served
    root = fetch_dataset(f"{url}/102flowers.tgz", digests["102flowers.tgz"], tmp_path / "raw", tmp_path / "cache")
    wrong = "0" * 64
    extras = [
        ExtraFile(url=f"{url}/imagelabels.mat", sha256=digests["imagelabels.mat"]),
        ExtraFile(url=f"{url}/setid.mat", sha256=wrong),
    ]
    with pytest.raises(RetrainError) as error:
        layouts.fetch_extra_files(extras, root, tmp_path / "cache")
    message = str(error.value)
    assert message.startswith(
        f"checksum mismatch for setid.mat ({url}/setid.mat): expected sha256 {wrong}, got {digests['setid.mat']}"
    )
    assert f"set data.extra_files[1].sha256 to {digests['setid.mat']}" in message
    assert not any("setid" in p.name for p in (tmp_path / "cache" / "downloads").iterdir())  # not kept


def test_extra_files_come_from_local_paths_and_a_changed_file_at_a_cached_url_is_fetched_again(tmp_path):
    folder, dest, cache = tmp_path / "served", tmp_path / "dest", tmp_path / "cache"
    folder.mkdir(), dest.mkdir()
    (folder / "labels.csv").write_text("path,label\n")
    old = file_sha256(folder / "labels.csv")
    with serve_folder(folder) as url:
        layouts.fetch_extra_files([ExtraFile(url=f"{url}/labels.csv", sha256=old)], dest, cache)
        (folder / "labels.csv").write_text("path,label\na.jpg,cat\n")  # the server's file changes
        new = file_sha256(folder / "labels.csv")
        layouts.fetch_extra_files([ExtraFile(url=f"{url}/labels.csv", sha256=new)], dest, cache)
    assert (dest / "labels.csv").read_text() == "path,label\na.jpg,cat\n"
    layouts.fetch_extra_files([ExtraFile(url=str(folder / "labels.csv"), sha256=new)], tmp_path, cache)
    assert (tmp_path / "labels.csv").read_text() == "path,label\na.jpg,cat\n"
    with pytest.raises(
        RetrainError, match=rf"labels.csv .*expected sha256 {old}, got {new}.*data.extra_files\[0\].sha256"
    ):
        layouts.fetch_extra_files([ExtraFile(url=f"file://{folder / 'labels.csv'}", sha256=old)], dest, cache)
    assert (folder / "labels.csv").exists()  # a local file is never deleted


@pytest.mark.parametrize(
    "damage, expected",
    [
        (
            lambda r: (r / "imagelabels.mat").write_bytes(b"not a mat file"),
            "imagelabels.mat: not a readable MATLAB file",
        ),
        (
            lambda r: _savemat(r / "imagelabels.mat", classes=([1, 2], np.uint8)),
            "no variable 'labels' (found: classes)",
        ),
        (
            lambda r: _savemat(r / "imagelabels.mat", labels=([0, 1, 2], np.uint8)),
            "'labels' must be positive whole numbers",
        ),
        (lambda r: (r / "setid.mat").unlink(), "setid.mat not found; list it in data.extra_files"),
        (
            lambda r: _savemat(
                r / "setid.mat", trnid=([1, 2], np.uint16), valid=([2], np.uint16), tstid=([3], np.uint16)
            ),
            "image 2 is in two sets (train and validation)",
        ),
        (
            lambda r: _savemat(
                r / "setid.mat", trnid=([1, 99], np.uint16), valid=([2], np.uint16), tstid=([3], np.uint16)
            ),
            "'trnid' lists image 99, but imagelabels.mat has 30 images",
        ),
        (
            lambda r: (r / "cat_to_name.json").write_text('{"1": "a", "2": "b"}'),
            "cat_to_name.json: no name for class 3",
        ),
        (
            lambda r: (r / "label_map.json").write_text('{"1": "a", "2": "a", "3": "c"}'),
            "the name 'a' is given to two classes",
        ),
    ],
)
def test_damaged_oxford_files_are_one_line_naming_the_file(served, tmp_path, damage, expected):
    url, digests = served
    root = _fetch(url, digests, tmp_path)
    damage(root)
    with pytest.raises(RetrainError) as error:
        _split_rows(root, tmp_path, "official")
    assert expected in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_dvc_repro_on_the_official_layout_then_predict_with_category_names(served, tmp_path, tiny_backbone):
    url, digests = served
    (tmp_path / "project").mkdir()
    root = make_project(tmp_path / "project", f"{url}/102flowers.tgz", digests["102flowers.tgz"], tiny_backbone)
    set_params(
        root,
        **{
            "data.layout": "oxford102",
            "data.split": "official",
            "data.extra_files": [{"url": f"{url}/{n}", "sha256": digests[n]} for n in ("imagelabels.mat", "setid.mat")],
        },
    )
    result = run(root, "dvc", "repro", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "13 train, 6 validation, 10 test, 1 rejected, 1 duplicates, 1 duplicates moved" in result.stdout
    split = (root / "data" / "split.csv").read_text()
    assert "data/raw/oxford102/jpg/image_00019.jpg,class_001,test," in split
    photo = tmp_path / "new_orchid.jpg"
    photo.write_bytes(image_bytes("JPEG", COLOURS[2], (48, 48), seed=999))
    (tmp_path / "label_map.json").write_text(json.dumps(NAMES))
    answer = run(
        root,
        sys.executable,
        "-m",
        "retrain",
        "predict",
        str(photo),
        "--top_k",
        "1",
        "--json",
        "--category_names",
        str(tmp_path / "label_map.json"),
    )
    assert json.loads(answer.stdout)[0]["predictions"][0]["label"] == "hard-leaved pocket orchid"
