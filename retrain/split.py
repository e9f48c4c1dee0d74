"""Decide which images are usable and which split each one belongs to.

A dataset is a folder of class folders (`<root>/<class>/.../<image>`). `scan_dataset` reads every
file once: its sha256, a header sniff with PIL (format and size, no pixels, so a decompression bomb
is rejected without allocating it), then a full decode with `retrain.images.decode_image`, the
decoder training and serving use, so split can never accept an image the model cannot read.
Files that fail get a human-readable reason in rejected.csv. `assign_split` is retrain.py's rule:
a hash of the file name picks train/validation/test, so adding images never moves existing ones.
Labels come from the class folders, or from a labels CSV or Oxford 102's .mat files
(`retrain.layouts`), whose official split can replace the hash rule. Files with identical content
always share a split (else a test image leaks into training): each group goes where its first
file by path goes, and duplicates.csv lists them. `split_dataset` runs the whole stage: list,
check, keep duplicates together, write the three CSV files.
"""

import csv
import functools
import hashlib
import io
import os
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf
from PIL import Image
from tqdm import tqdm

from retrain import layouts
from retrain.atomic import atomic_file
from retrain.errors import RetrainError
from retrain.images import decode_image

SPLITS = ("train", "validation", "test")
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (~89 MP)
# retrain.py's constant: the hash is taken modulo this + 1 and scaled to [0, 100].
_MAX_NUM_IMAGES_PER_CLASS = 2**27 - 1
# What tf.io.decode_image reads (MPO is a multi-picture JPEG from cameras; it decodes as JPEG).
_DECODABLE_FORMATS = {"JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP"}


@dataclass(frozen=True)
class ImageRow:
    """A usable image: where it is, its class (first-level folder name) and content hash."""

    path: Path
    label: str
    sha256: str


@dataclass(frozen=True)
class Rejection:
    """A file or folder left out, with a reason a person understands."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Listing:
    """What a dataset folder offers before any file is read: (path, label) candidates, files left
    out already, the class names, and the split the dataset itself fixes per path (may be empty)."""

    candidates: list[tuple[Path, str]]
    rejected: list[Rejection]
    classes: list[str]
    official: dict[Path, str]


def assign_split(filename: str, validation_percentage: float, testing_percentage: float) -> str:
    """"train", "validation" or "test" for a file, by TensorFlow's retrain.py rule (`which_set`).

    Only the base name counts, and anything after "_nohash_" in it is ignored, so variants of one
    photo ("cat_nohash_1.jpg", "cat_nohash_2.jpg") always share a split.
    """
    hash_name = re.sub(r"_nohash_.*$", "", os.path.basename(filename))
    hashed = int(hashlib.sha1(hash_name.encode("utf-8")).hexdigest(), 16)
    percentage = (hashed % (_MAX_NUM_IMAGES_PER_CLASS + 1)) * (100.0 / _MAX_NUM_IMAGES_PER_CLASS)
    if percentage < validation_percentage:
        return "validation"
    if percentage < validation_percentage + testing_percentage:
        return "test"
    return "train"


def class_names(root: Path) -> list[str]:
    """Sorted names of the class folders in `root` (hidden folders ignored); at least two."""
    root = Path(root)
    if not root.is_dir():
        raise RetrainError(f"{root} is not a folder; run the download stage first (dvc repro download)")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name))
    if not names:
        raise RetrainError(
            f"no class folders in {root}: put the images in one folder per class, e.g. {root}/daisy/1.jpg"
        )
    if len(names) == 1:
        raise RetrainError(f"only one class folder in {root} ({names[0]}): a classifier needs at least two classes")
    return names


def scan_dataset(
    root: Path, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, workers: int | None = None
) -> tuple[list[ImageRow], list[Rejection]]:
    """Check every file under each class folder of `root`; return (usable images, rejections).

    Rows come in walk order (classes sorted, then sorted paths). Symlinks are followed; a link back
    to a folder already scanned is a loop and is rejected. `workers` threads read and decode
    (TensorFlow releases the GIL while decoding); default: twice the CPU count.
    """
    listing = list_dataset(root)
    return check_files(listing.candidates, listing.rejected, max_image_pixels=max_image_pixels, workers=workers)


def list_dataset(root: Path, *, layout: str = "folders", labels: str | None = None, official_split: bool = False) -> Listing:
    """The candidates of `root`: class folders, or the images a labels CSV (`labels`, relative to
    root) or Oxford 102's files (layout "oxford102") list, with that dataset's split if asked."""
    root = Path(root)
    if layout == "oxford102":
        own = {layouts.OXFORD_LABELS, layouts.OXFORD_SETS, *layouts.OXFORD_NAMES}
        return _listing_from_table(root, layouts.read_oxford102(root, official_split), layouts.OXFORD_LABELS, own, official_split)
    if labels:
        table = layouts.read_labels_csv(root, labels)
        return _listing_from_table(root, table, labels, {Path(labels).as_posix()}, official_split=False)
    classes, candidates, rejected = class_names(root), [], []
    for label in classes:
        _walk_class(root / label, label, candidates, rejected)
    return Listing(candidates, rejected, classes, {})


def check_files(
    candidates: list[tuple[Path, str]],
    rejected: list[Rejection],
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    workers: int | None = None,
) -> tuple[list[ImageRow], list[Rejection]]:
    """Read and decode every candidate; return (usable images, `rejected` plus the failures)."""
    rejected = list(rejected)
    workers = workers or 2 * (os.cpu_count() or 1)
    check = functools.partial(_check_file, max_image_pixels=max_image_pixels)
    rows = []
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(check, *zip(*candidates)) if candidates else []
        for result in tqdm(results, total=len(candidates), desc="checking images", unit="img", leave=False):
            (rows if isinstance(result, ImageRow) else rejected).append(result)
    return rows, rejected


def write_split(
    rows: list[ImageRow],
    rejected: list[Rejection],
    split_csv: Path,
    rejected_csv: Path,
    *,
    classes: list[str],
    base_dir: Path,
    validation_percentage: float,
    testing_percentage: float,
    min_images_per_class: int,
    duplicates_csv: Path | None = None,
    official: dict[Path, str] | None = None,
) -> dict[str, int]:
    """Write rejected.csv (path,reason), check every class, then write split.csv and duplicates.csv.

    split.csv has columns path,label,split,sha256, sorted by path; paths are relative to base_dir
    with "/" separators. A row's split is `official[path]` when given, else the hash rule; then
    each group of identical files moves to its first file's split (duplicates.csv, default beside
    split.csv: path,label,split,sha256,moved_from). rejected.csv is written first so that it
    explains a class that comes up short: a class with fewer than min_images_per_class usable
    images raises RetrainError and split.csv is not written. Returns the number of images per
    split, of rejections, of duplicates (files whose content an earlier file has) and of those moved.
    """
    relative = functools.partial(_relative_posix, base_dir=Path(base_dir))
    _write_csv(rejected_csv, ["path", "reason"], sorted((relative(r.path), r.reason) for r in rejected))
    counts = Counter(row.label for row in rows)
    for label in classes:
        if counts[label] < min_images_per_class:
            raise RetrainError(
                f"class {label!r} has {counts[label]} usable image{'s' * (counts[label] != 1)}, fewer than "
                f"data.min_images_per_class={min_images_per_class}; add images or remove the folder (why: {rejected_csv})"
            )
    split_of = functools.partial(
        assign_split, validation_percentage=validation_percentage, testing_percentage=testing_percentage
    )
    official = official or {}
    table = sorted(
        (relative(row.path), row.label, official.get(row.path) or split_of(row.path.name), row.sha256) for row in rows
    )
    table, duplicates = keep_duplicates_together(table)
    _write_csv(split_csv, ["path", "label", "split", "sha256"], table)
    _write_csv(duplicates_csv or Path(split_csv).with_name("duplicates.csv"), DUPLICATES_HEADER, duplicates)
    totals = Counter(split for _, _, split, _ in table)
    return {
        **{split: totals[split] for split in SPLITS},
        "rejected": len(rejected),
        "duplicates": len(duplicates) - len({sha for *_, sha, _ in duplicates}),
        "duplicates_moved": sum(1 for *_, moved_from in duplicates if moved_from),
    }


DUPLICATES_HEADER = ["path", "label", "split", "sha256", "moved_from"]


def keep_duplicates_together(table: list[tuple]) -> tuple[list[tuple], list[tuple]]:
    """Put every group of rows with one sha256 in the split of its first row (table is path-sorted).

    Returns (the table with splits fixed, one duplicates.csv row per member of a group of two or
    more: path, label, split, sha256, and the split the rule gave it if it moved, else "").
    Adding a file never moves a group unless the new file sorts first in its group.
    """
    groups = defaultdict(list)
    for row in table:
        groups[row[3]].append(row)
    target = {sha: members[0][2] for sha, members in groups.items()}
    fixed = [(path, label, target[sha], sha) for path, label, _, sha in table]
    duplicates = [
        (path, label, target[sha], sha, "" if split == target[sha] else split)
        for path, label, split, sha in table
        if len(groups[sha]) > 1
    ]
    return fixed, sorted(duplicates, key=lambda row: (row[3], row[0]))  # groups together


def split_dataset(
    root: Path,
    split_csv: Path,
    rejected_csv: Path,
    *,
    base_dir: Path,
    validation_percentage: float,
    testing_percentage: float,
    min_images_per_class: int,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    duplicates_csv: Path | None = None,
    layout: str = "folders",
    labels: str | None = None,
    split: str = "hash",
) -> dict[str, int]:
    """The split stage: list and check `root`, write rejected.csv, split.csv and duplicates.csv.

    layout "folders" (labels: a CSV in root, or None for class folders) or "oxford102"; split
    "hash" (retrain.py's rule) or "official" (the dataset's own, oxford102 only). Returns the counts.
    """
    listing = list_dataset(root, layout=layout, labels=labels, official_split=split == "official")
    rows, rejected = check_files(listing.candidates, listing.rejected, max_image_pixels=max_image_pixels)
    return write_split(
        rows,
        rejected,
        split_csv,
        rejected_csv,
        classes=listing.classes,
        base_dir=base_dir,
        validation_percentage=validation_percentage,
        testing_percentage=testing_percentage,
        min_images_per_class=min_images_per_class,
        duplicates_csv=duplicates_csv,
        official=listing.official,
    )


# --- walking -----------------------------------------------------------------------------------


def _listing_from_table(root: Path, table: list, source: str, own_files: set[str], official_split: bool) -> Listing:
    """Match a label file's table with the files under root: each side's extras become rejections.

    A listed file that is missing, a file on disk that is not listed (except the label files
    themselves) and, with official_split, a listed file in none of the official sets are warnings
    in rejected.csv; a class left with too few images then stops the stage in write_split.
    """
    if not root.is_dir():
        raise RetrainError(f"{root} is not a folder; run the download stage first (dvc repro download)")
    on_disk, rejected = [], []
    _walk_class(root, "", on_disk, rejected)
    on_disk = {_relative_posix(path, root): path for path, _ in on_disk}
    candidates, official = [], {}
    for entry in table:
        path = root / entry.path
        if entry.path not in on_disk:
            rejected.append(Rejection(path, f"listed in {entry.where} but not found"))
        elif official_split and entry.split is None:
            rejected.append(Rejection(path, "in no set of the official split (data.split: official), skipped"))
        else:
            candidates.append((on_disk[entry.path], entry.label))
            if entry.split:
                official[on_disk[entry.path]] = entry.split
    listed = {entry.path for entry in table}
    for relative, path in on_disk.items():
        if relative not in listed and relative not in own_files:
            rejected.append(Rejection(path, f"not listed in {source}, skipped"))
    classes = sorted({entry.label for entry in table})
    if len(classes) < 2:
        raise RetrainError(f"{root / source}: lists {len(classes)} class{'es' * (len(classes) != 1)}; a classifier needs at least two")
    return Listing(candidates, rejected, classes, official)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _walk_class(folder: Path, label: str, candidates: list, rejected: list) -> None:
    """Append (path, label) for each candidate file; hidden files, loops and errors to `rejected`."""
    # The class folder's ancestors count as scanned: a link up to one of them is a loop too.
    seen = {_folder_id(p) for p in [folder, *folder.resolve().parents]}
    seen.discard(_folder_id(folder))

    def unreadable(error: OSError) -> None:
        rejected.append(Rejection(Path(error.filename), f"cannot read folder ({error.strerror})"))

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=unreadable):
        if _folder_id(dirpath) in seen:
            rejected.append(Rejection(Path(dirpath), "symlink loop (links to a folder already scanned), skipped"))
            dirnames.clear()
            continue
        seen.add(_folder_id(dirpath))
        for name in sorted(dirnames):
            if _is_hidden(name):
                rejected.append(Rejection(Path(dirpath, name), "hidden folder, skipped"))
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if _is_hidden(name):
                rejected.append(Rejection(Path(dirpath, name), "hidden file, skipped"))
            else:
                candidates.append((Path(dirpath, name), label))


def _folder_id(path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


# --- checking one file -------------------------------------------------------------------------


def _check_file(path: Path, label: str, max_image_pixels: int) -> ImageRow | Rejection:
    try:
        data = path.read_bytes()
    except OSError as e:
        return Rejection(path, "broken symlink" if path.is_symlink() else f"cannot read file ({e.strerror})")
    reason = rejection_reason(data, max_image_pixels)
    if reason:
        return Rejection(path, reason)
    return ImageRow(path, label, hashlib.sha256(data).hexdigest())


def rejection_reason(data: bytes, max_image_pixels: int) -> str | None:
    """Why these bytes are no usable image, or None when they decode like training will.

    Never raises, whatever the bytes (tests/test_fuzz.py); `retrain predict` uses it to explain
    a file the model could not decode.
    """
    if not data:
        return "empty file"
    header = sniff_image(data)
    if header is None:
        if fmt := _magic_format(data):
            return f"corrupt {fmt} (damaged header)"
        return "not an image (text file)" if _looks_like_text(data) else "not an image (unknown format)"
    fmt, (width, height) = header
    if fmt not in _DECODABLE_FORMATS:
        return f"{fmt} image: format not supported (use JPEG, PNG, GIF, BMP or WebP)"
    if width * height > max_image_pixels:
        return (
            f"image is {width}x{height} = {width * height / 1e6:.0f} MP, "
            f"over the {max_image_pixels / 1e6:.0f} MP limit (data.max_image_pixels)"
        )
    try:
        _decoded_shape()(tf.constant(data))
    except tf.errors.OpError:
        return f"truncated {fmt}" if _looks_truncated(fmt, data) else f"corrupt {fmt} (cannot be decoded)"
    return None


def sniff_image(data: bytes) -> tuple[str, tuple[int, int]] | None:
    """(PIL format, (width, height)) from the header alone, or None if no plugin recognises it.

    Image.open would do this but applies PIL's global decompression-bomb limit; this is its
    format loop without that check, so the caller's pixel limit alone decides and nothing is
    decoded. `retrain predict` checks files with it too.
    """
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            accepted = accept(prefix) if accept else True
            if not accepted or isinstance(accepted, str):  # a str is PIL's "almost, but no"
                continue
            image = factory(io.BytesIO(data), None)
            return fmt, image.size
        except Exception:  # any bytes can arrive here: a plugin that chokes on them just says no
            continue
    return None


def _magic_format(data: bytes) -> str | None:
    """The format a file's first bytes claim, for files PIL cannot parse (BMP's "BM" is too weak)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _looks_like_text(data: bytes) -> bool:
    head = data[:4096]
    return b"\0" not in head and head.decode("utf-8", "replace").count("\ufffd") <= 1


def _looks_truncated(fmt: str, data: bytes) -> bool:
    tail = data[-64:]
    if fmt in ("JPEG", "MPO"):
        return b"\xff\xd9" not in tail
    if fmt == "PNG":
        return b"IEND" not in tail
    return False


@functools.cache
def _decoded_shape():
    """decode_image as one compiled function that returns only the shape (no pixels copied out)."""
    return tf.function(
        lambda contents: tf.shape(decode_image(contents)), input_signature=[tf.TensorSpec([], tf.string)]
    )


# --- writing -----------------------------------------------------------------------------------


def _relative_posix(path: Path, base_dir: Path) -> str:
    return Path(os.path.relpath(path, base_dir)).as_posix()


def _write_csv(path: Path, header: list[str], rows) -> None:
    """Write atomically: a killed run leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, ".csv") as temp, open(temp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
