"""split: retrain.py's hash rule, which files are usable, and the two CSV files a user reads."""

import csv
import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imagegen import image_bytes, make_class_folders, png_16bit_bytes, png_header_only
from retrain.errors import RetrainError
from retrain.split import assign_split, scan_dataset, split_dataset

SETTINGS = {"validation_percentage": 10, "testing_percentage": 10, "min_images_per_class": 2}


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _split(root: Path, out: Path, **overrides) -> tuple[list[dict], dict[str, str]]:
    counts = split_dataset(root, out / "split.csv", out / "rejected.csv", base_dir=out, **{**SETTINGS, **overrides})
    rows = _read_csv(out / "split.csv")
    assert counts["train"] + counts["validation"] + counts["test"] == len(rows)
    return rows, {r["path"]: r["reason"] for r in _read_csv(out / "rejected.csv")}


# --- the rule ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, percentage",  # sha1 of the base name, as retrain.py / speech_commands' which_set compute it
    [("cat.jpg", 52.2159334), ("e.jpg", 4.8943676), ("b.jpg", 10.7616902), ("rosé.jpg", 13.3494080)],
)
def test_the_retrain_py_rule_on_known_names(name, percentage):
    assert assign_split(name, 10, 10) == ("validation" if percentage < 10 else "test" if percentage < 20 else "train")
    assert assign_split(name, percentage + 0.001, 0) == "validation"
    assert assign_split(name, percentage - 0.001, 0.002) == "test"
    assert assign_split(name, percentage - 0.002, 0.001) == "train"
    assert assign_split(f"/any/folder/daisy/{name}", 10, 10) == assign_split(name, 10, 10)  # base name only


def test_nohash_variants_share_a_split():
    for stem in ["cat", "a", "photo_42", "x"]:
        variants = {assign_split(f"{stem}_nohash_{i}.jpg", 30, 30) for i in range(20)}
        variants.add(assign_split(f"dir/{stem}_nohash_other_suffix.png", 30, 30))
        assert variants == {assign_split(stem, 30, 30)}


def test_percentages_are_roughly_respected():
    splits = [assign_split(f"IMG_{i:05d}.jpg", 15, 10) for i in range(1000)]
    assert 100 <= splits.count("validation") <= 200
    assert 55 <= splits.count("test") <= 145
    assert assign_split("anything.jpg", 0, 0) == "train"
    assert assign_split("anything.jpg", 100, 0) == "validation"


def test_adding_images_never_moves_existing_ones(tmp_path):
    make_class_folders(tmp_path / "photos", per_class=15)
    before, _ = _split(tmp_path / "photos", tmp_path)
    make_class_folders(tmp_path / "photos", classes={"red": (255, 0, 0), "yellow": (255, 255, 0)}, per_class=40)
    after, _ = _split(tmp_path / "photos", tmp_path)
    assert len(after) == 45 + (40 - 15) + 40
    moved = {r["path"]: r["split"] for r in after}
    assert all(moved[r["path"]] == r["split"] for r in before)


# --- the CSV files -----------------------------------------------------------------------------


def test_split_csv_is_sorted_relative_posix_with_content_hashes(tmp_path):
    written = make_class_folders(tmp_path / "data" / "raw" / "flowers", per_class=6)
    rows, rejected = _split(tmp_path / "data" / "raw" / "flowers", tmp_path)
    assert rejected == {}
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    assert rows[0]["path"] == "data/raw/flowers/blue/blue_0000.jpg"
    assert {r["label"] for r in rows} == {"red", "green", "blue"}
    by_path = {r["path"]: r for r in rows}
    for label, paths in written.items():
        for path in paths:
            row = by_path[path.relative_to(tmp_path).as_posix()]
            assert row["label"] == label
            assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert row["split"] == assign_split(path.name, 10, 10)
    assert (tmp_path / "split.csv").read_text().splitlines()[0] == "path,label,split,sha256"


def test_bad_files_are_named_in_rejected_csv_with_a_reason(tmp_path):
    root = tmp_path / "photos"
    make_class_folders(root, per_class=3)
    bad = root / "red"
    good_jpeg = image_bytes("JPEG", size=(200, 150))
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) * 2 // 3])
    (bad / "notes.jpg").write_text("these are my holiday photos\n")
    (bad / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + bytes(100))
    (bad / "huge.png").write_bytes(png_header_only(100_000, 100_000))
    (bad / "scan.tiff").write_bytes(image_bytes("TIFF"))
    (bad / ".thumbnails").mkdir()
    (bad / ".thumbnails" / "t.jpg").write_bytes(good_jpeg)
    os.symlink("missing.jpg", bad / "dangling.jpg")
    os.symlink("..", bad / "loop")
    rows, rejected = _split(root, tmp_path, max_image_pixels=50_000_000)
    expected = {
        "empty.jpg": "empty file",
        "truncated.jpg": "truncated JPEG",
        "notes.jpg": "not an image (text file)",
        ".DS_Store": "hidden file, skipped",
        "huge.png": "image is 100000x100000 = 10000 MP, over the 50 MP limit (data.max_image_pixels)",
        "scan.tiff": "TIFF image: format not supported (use JPEG, PNG, GIF, BMP or WebP)",
        ".thumbnails": "hidden folder, skipped",
        "dangling.jpg": "broken symlink",
        "loop": "symlink loop (links to a folder already scanned), skipped",
    }
    assert rejected == {f"photos/red/{name}": reason for name, reason in expected.items()}
    assert len(rows) == 9


def test_a_decompression_bomb_is_rejected_before_anything_is_allocated(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "bomb.png").write_bytes(png_header_only(100_000, 100_000))  # 30 GB if decoded
    (tmp_path / "b" / "bomb.gif").write_bytes(image_bytes("GIF", size=(300, 300)))
    rows, rejected = scan_dataset(tmp_path, max_image_pixels=89_478_485)
    assert [r.path.name for r in rows] == ["bomb.gif"]
    assert rejected[0].reason == "image is 100000x100000 = 10000 MP, over the 89 MP limit (data.max_image_pixels)"
    rows, rejected = scan_dataset(tmp_path, max_image_pixels=300 * 300 - 1)
    assert rows == [] and "300x300 = 0 MP" in rejected[1].reason


def test_every_format_the_decoder_reads_is_accepted_whatever_its_name(tmp_path):
    root = tmp_path / "photos"
    make_class_folders(root, per_class=2)
    odd = {
        "png_named.jpg": image_bytes("PNG"),
        "webp_named.jpg": image_bytes("WEBP"),
        "bmp_named.jpg": image_bytes("BMP"),
        "animated.gif": image_bytes("GIF"),
        "grayscale.jpg": image_bytes("JPEG", mode="L"),
        "cmyk.jpg": image_bytes("JPEG", mode="CMYK"),
        "rgba.png": image_bytes("PNG", mode="RGBA"),
        "palette.png": image_bytes("PNG", mode="P"),
        "sixteen_bit.png": png_16bit_bytes(),
        "rosé été.jpg": image_bytes("JPEG"),
        "向日葵.JPG": image_bytes("JPEG"),
    }
    for name, data in odd.items():
        (root / "blue" / name).write_bytes(data)
    (root / "green" / "nested" / "deeper").mkdir(parents=True)
    (root / "green" / "nested" / "deeper" / "inside.jpeg").write_bytes(image_bytes("JPEG"))
    rows, rejected = _split(root, tmp_path)
    assert rejected == {}
    paths = {r["path"] for r in rows}
    assert {f"photos/blue/{name}" for name in odd} <= paths
    assert "photos/green/nested/deeper/inside.jpeg" in paths
    assert {r["label"] for r in rows if "nested" in r["path"]} == {"green"}


# --- structural problems -----------------------------------------------------------------------


def _one_line_error(tmp_path: Path, root: Path, **overrides) -> str:
    with pytest.raises(RetrainError) as error:
        _split(root, tmp_path / "out", **overrides)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_no_class_folders_is_one_line_naming_the_folder(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "stray.jpg").write_bytes(image_bytes("JPEG"))
    (root / ".git").mkdir()
    message = _one_line_error(tmp_path, root)
    assert "no class folders" in message and str(root) in message
    assert "not a folder" in _one_line_error(tmp_path, tmp_path / "missing")


def test_a_single_class_is_an_error(tmp_path):
    make_class_folders(tmp_path / "photos", classes={"red": (255, 0, 0)}, per_class=3)
    assert "only one class folder" in _one_line_error(tmp_path, tmp_path / "photos")


def test_a_class_short_of_usable_images_names_it_and_keeps_rejected_csv(tmp_path):
    root = tmp_path / "photos"
    make_class_folders(root, per_class=3)
    for path in (root / "green").iterdir():
        path.write_bytes(b"")
    (root / "empty_class").mkdir()
    message = _one_line_error(tmp_path, root, min_images_per_class=3)
    assert "class 'empty_class' has 0 usable images" in message and "data.min_images_per_class=3" in message
    assert len(_read_csv(tmp_path / "out" / "rejected.csv")) == 3  # the reasons survive the error
    assert not (tmp_path / "out" / "split.csv").exists()
    (root / "empty_class").rmdir()
    assert "class 'green' has 0 usable images" in _one_line_error(tmp_path, root, min_images_per_class=3)


@given(
    name=st.text(st.characters(blacklist_characters="/\0", blacklist_categories=["Cs"]), min_size=1),
    validation=st.floats(0, 60),
    testing=st.floats(0, 40),
    more=st.floats(0, 40),
)
def test_raising_a_percentage_only_moves_images_into_that_split(name, validation, testing, more):
    before = assign_split(name, validation, testing)
    assert before in ("train", "validation", "test")
    if before == "validation":
        assert assign_split(name, validation + more, testing) == "validation"
    if before == "train":
        assert assign_split(name, validation, testing + more) in ("train", "test")


# --- duplicates across splits ------------------------------------------------------------------


def _names_in_splits(wanted: list[str], validation=30, testing=30) -> list[str]:
    """File names whose hash puts them, in order, in the wanted splits."""
    names, i = [], 0
    for split in wanted:
        while assign_split(f"photo_{i}.jpg", validation, testing) != split:
            i += 1
        names.append(f"photo_{i}.jpg")
        i += 1
    return names


def test_identical_files_share_the_split_of_their_first_file_and_are_listed(tmp_path):
    root = tmp_path / "photos"
    make_class_folders(root, per_class=4)
    same = image_bytes("JPEG", (9, 99, 199), seed=7)
    names = _names_in_splits(["test", "train", "validation"])
    for folder, name in zip(["blue", "green", "red"], names):  # path order: blue < green < red
        (root / folder / name).write_bytes(same)
    rows, _ = _split(root, tmp_path, validation_percentage=30, testing_percentage=30)
    by_path = {r["path"]: r["split"] for r in rows}
    assert [by_path[f"photos/{f}/{n}"] for f, n in zip(["blue", "green", "red"], names)] == ["test"] * 3
    duplicates = _read_csv(tmp_path / "duplicates.csv")
    assert [(d["path"], d["split"], d["moved_from"]) for d in duplicates] == [
        (f"photos/blue/{names[0]}", "test", ""),
        (f"photos/green/{names[1]}", "test", "train"),
        (f"photos/red/{names[2]}", "test", "validation"),
    ]
    assert {d["sha256"] for d in duplicates} == {hashlib.sha256(same).hexdigest()}
    counts = split_dataset(
        root,
        tmp_path / "split.csv",
        tmp_path / "rejected.csv",
        base_dir=tmp_path,
        **{**SETTINGS, "validation_percentage": 30, "testing_percentage": 30},
    )
    assert (counts["duplicates"], counts["duplicates_moved"]) == (2, 2)
    # Adding files never moves the group unless the newcomer sorts first in it.
    (root / "red" / "zz_late_copy.jpg").write_bytes(same)
    make_class_folders(root, per_class=8)
    after, _ = _split(root, tmp_path, validation_percentage=30, testing_percentage=30)
    assert {r["path"]: r["split"] for r in after if r["path"] in by_path} == by_path
    assert len(_read_csv(tmp_path / "duplicates.csv")) == 4


def test_without_duplicates_the_file_is_just_its_header(tmp_path):
    make_class_folders(tmp_path / "photos", per_class=3)
    counts = split_dataset(
        tmp_path / "photos",
        tmp_path / "split.csv",
        tmp_path / "rejected.csv",
        duplicates_csv=tmp_path / "d" / "dups.csv",
        base_dir=tmp_path,
        **SETTINGS,
    )
    assert (counts["duplicates"], counts["duplicates_moved"]) == (0, 0)
    assert (tmp_path / "d" / "dups.csv").read_text() == "path,label,split,sha256,moved_from\n"


# --- a labels CSV ------------------------------------------------------------------------------


def _csv_dataset(root: Path, listing: str, files: list[str]) -> Path:
    """Images at root/<file> (distinct content each) and root/labels.csv holding `listing`."""
    for i, name in enumerate(files):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(image_bytes("JPEG", (i * 20 % 256, 90, 200 - i * 10), seed=i))
    (root / "labels.csv").write_text(listing, encoding="utf-8")
    return root


def test_labels_come_from_the_csv_and_extra_or_missing_files_are_rejected_with_a_reason(tmp_path):
    root = _csv_dataset(
        tmp_path / "ds",
        "path,label\na.jpg,cat\n./img/b.jpg,cat\nimg\\c.jpg,dog\nd.jpg,dog\ngone.jpg,dog\n\n",
        ["a.jpg", "img/b.jpg", "img/c.jpg", "d.jpg", "img/stray.jpg"],
    )
    rows, rejected = _split(root, tmp_path, labels="labels.csv")
    assert {r["path"]: r["label"] for r in rows} == {
        "ds/a.jpg": "cat",
        "ds/img/b.jpg": "cat",
        "ds/img/c.jpg": "dog",
        "ds/d.jpg": "dog",
    }
    assert rejected == {
        "ds/gone.jpg": "listed in labels.csv line 6 but not found",
        "ds/img/stray.jpg": "not listed in labels.csv, skipped",
    }


def test_a_class_whose_listed_files_are_all_missing_stops_the_stage(tmp_path):
    root = _csv_dataset(tmp_path / "ds", "label,path\ncat,a.jpg\ncat,b.jpg\nbird,x.jpg\n", ["a.jpg", "b.jpg"])
    message = _one_line_error(tmp_path, root, labels="labels.csv")
    assert "class 'bird' has 0 usable images" in message
    assert _read_csv(tmp_path / "out" / "rejected.csv") == [
        {"path": "../ds/x.jpg", "reason": "listed in labels.csv line 4 but not found"}
    ]


@pytest.mark.parametrize(
    "listing, expected",
    [
        ("file,class\na.jpg,cat\n", "the first line must name the columns path,label (got file,class)"),
        ("", "the first line must name the columns path,label (got nothing)"),
        (
            "path,label\na.jpg,cat\n../b.jpg,dog\n",
            "labels.csv line 3: path '../b.jpg' is not inside the dataset folder",
        ),
        ("path,label\n/etc/passwd,dog\n", "path '/etc/passwd' is not inside the dataset folder"),
        ("path,label\na.jpg,cat\nb.jpg\n", "labels.csv line 3: expected a path and a label, got 'b.jpg'"),
        (
            "path,label\na.jpg,cat\nb.jpg,dog\n./a.jpg,dog\n",
            "a.jpg is listed twice (labels.csv line 2 and labels.csv line 4)",
        ),
        ("path,label\na.jpg,cat\nb.jpg,cat\n", "lists 1 class; a classifier needs at least two"),
    ],
)
def test_a_malformed_labels_csv_is_one_line_naming_it(tmp_path, listing, expected):
    root = _csv_dataset(tmp_path / "ds", listing, ["a.jpg", "b.jpg"])
    assert expected in _one_line_error(tmp_path, root, labels="labels.csv")


def test_a_missing_labels_csv_names_the_param(tmp_path):
    make_class_folders(tmp_path / "photos", per_class=2)
    assert "data.labels:" in _one_line_error(tmp_path, tmp_path / "photos", labels="labels.csv")
