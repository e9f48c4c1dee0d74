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
