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
file by path goes, and duplicates.csv lists them. Photos that only look alike (burst shots,
resized copies) join those groups when `data.near_duplicate_distance` is set (`retrain.phash`;
near_duplicates.csv), and photos a person excluded (`data.exclude`, `retrain.exclusions`) go to
rejected.csv unread. `split_dataset` runs the whole stage: list, drop the excluded, check, keep
duplicates together, write the four CSV files.
"""

import csv
import functools
import hashlib
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from retrain import layouts
from retrain.atomic import atomic_file
from retrain.errors import RetrainError
from retrain.exclusions import exclusion_reason, read_exclusions
from retrain.images import FORMATS, ImageError, decode_image, sniff_image
from retrain.limits import MAX_IMAGE_PIXELS
from retrain.paths import SPLITS
from retrain.phash import connected_groups, near_pairs, perceptual_hashes

# retrain.py's constant: the hash is taken modulo this + 1 and scaled to [0, 100].
_MAX_NUM_IMAGES_PER_CLASS = 2**27 - 1
_DECODABLE_FORMATS = set(FORMATS)  # what the decoder reads


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
    """ "train", "validation" or "test" for a file, by TensorFlow's retrain.py rule (`which_set`).

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
    for name in names:  # a class name must survive labels.txt (one a line) and every CSV
        layouts.check_label(
            name, f"class folder in {root}", "rename the folder (one line, UTF-8, no control characters)"
        )
    if not names:
        raise RetrainError(
            f"no class folders in {root}: put the images in one folder per class, e.g. {root}/daisy/1.jpg"
        )
    if len(names) == 1:
        raise RetrainError(f"only one class folder in {root} ({names[0]}): a classifier needs at least two classes")
    return names


def scan_dataset(
    root: Path, *, max_image_pixels: int = MAX_IMAGE_PIXELS, workers: int | None = None
) -> tuple[list[ImageRow], list[Rejection]]:
    """Check every file under each class folder of `root`; return (usable images, rejections).

    Rows come in walk order (classes sorted, then sorted paths). Symlinks are followed; a link back
    to a folder already scanned is a loop and is rejected. `workers` threads read and decode
    (TensorFlow releases the GIL while decoding); default: twice the CPU count.
    """
    listing = list_dataset(root)
    return check_files(listing.candidates, listing.rejected, max_image_pixels=max_image_pixels, workers=workers)


def list_dataset(
    root: Path, *, layout: str = "folders", labels: str | None = None, official_split: bool = False
) -> Listing:
    """The candidates of `root`: class folders, or the images a labels CSV (`labels`, relative to
    root) or Oxford 102's files (layout "oxford102") list, with that dataset's split if asked."""
    root = Path(root)
    if layout == "oxford102":
        own = {layouts.OXFORD_LABELS, layouts.OXFORD_SETS, *layouts.OXFORD_NAMES}
        return _listing_from_table(
            root, layouts.read_oxford102(root, official_split), layouts.OXFORD_LABELS, own, official_split
        )
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
    max_image_pixels: int = MAX_IMAGE_PIXELS,
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
    lookalikes: list[tuple[Path, Path, int]] = (),
    near_duplicates_csv: Path | None = None,
) -> dict[str, int]:
    """Write rejected.csv (path,reason), check every class, then write split.csv and duplicates.csv.

    split.csv has columns path,label,split,sha256, sorted by path; paths are relative to base_dir
    with "/" separators. A row's split is `official[path]` when given, else the hash rule; then
    each group of identical files moves to its first file's split (duplicates.csv, default beside
    split.csv: path,label,split,sha256,moved_from). rejected.csv is written first so that it
    explains a class that comes up short: a class with fewer than min_images_per_class usable
    images raises RetrainError and split.csv is not written. Returns the number of images per
    split, of rejections, of duplicates (files whose content an earlier file has) and of those moved.
    `lookalikes`, (path, path, hash distance) pairs of photos that look alike (`retrain.phash`),
    join groups the same way; near_duplicates.csv (default beside split.csv) lists their groups.
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
    lookalikes = [(relative(a), relative(b), distance) for a, b, distance in lookalikes]
    unmoved = {path: split for path, _, split, _ in table}
    table, duplicates = keep_duplicates_together(table, lookalikes)
    if table and not any(split == "test" for _, _, split, _ in table):
        # Evaluate and export have nothing to measure: stop here, not with a traceback three stages on.
        raise RetrainError(
            f"the test split would be empty ({len(table)} images, data.testing_percentage={testing_percentage}; "
            "the split follows file names, and repeated names share one): raise data.testing_percentage or add images"
        )
    _write_csv(split_csv, ["path", "label", "split", "sha256"], table)
    _write_csv(duplicates_csv or Path(split_csv).with_name("duplicates.csv"), DUPLICATES_HEADER, duplicates)
    near = _near_duplicate_rows(table, lookalikes, unmoved)
    _write_csv(near_duplicates_csv or Path(split_csv).with_name("near_duplicates.csv"), NEAR_DUPLICATES_HEADER, near)
    totals = Counter(split for _, _, split, _ in table)
    return {
        **{split: totals[split] for split in SPLITS},
        "rejected": len(rejected),
        "duplicates": len(duplicates) - len({sha for *_, sha, _ in duplicates}),
        "duplicates_moved": sum(1 for *_, moved_from in duplicates if moved_from),
        "near_duplicates": len(near) - len({row[3] for row in near}),
        "near_duplicates_moved": sum(1 for *_, moved_from in near if moved_from),
    }


DUPLICATES_HEADER = ["path", "label", "split", "sha256", "moved_from"]


def keep_duplicates_together(table: list[tuple], lookalikes=()) -> tuple[list[tuple], list[tuple]]:
    """Put every group of rows with one sha256 in the split of its first row (table is path-sorted).

    `lookalikes`: (path, path, ...) pairs that belong together too (near-duplicates): a group is
    then every row linked to another by content or by a pair, and goes where its first path goes.
    Returns (the table with splits fixed, one duplicates.csv row per member of a group of two or
    more identical files: path, label, split, sha256, and the split the rule gave it if it moved,
    else ""). Adding a file never moves a group unless the new file sorts first in its group.
    """
    first = _groups(table, lookalikes)
    fixed = [(path, label, table[first[index]][2], sha) for index, (path, label, _, sha) in enumerate(table)]
    copies = Counter(row[3] for row in table)
    duplicates = [
        (path, label, target, sha, "" if split == target else split)
        for (path, label, split, sha), (_, _, target, _) in zip(table, fixed)
        if copies[sha] > 1
    ]
    return fixed, sorted(duplicates, key=lambda row: (row[3], row[0]))  # groups together


NEAR_DUPLICATES_HEADER = ["path", "label", "split", "group", "moved_from"]


def _groups(table: list[tuple], lookalikes) -> list[int]:
    """Each row's group as the index of its first row: rows linked by sha256 or by a lookalike pair."""
    position = {row[0]: index for index, row in enumerate(table)}
    seen = {}
    links = [(seen.setdefault(row[3], index), index) for index, row in enumerate(table)]
    links += [(position[a], position[b]) for a, b, *_ in lookalikes]
    return connected_groups(len(table), links)  # a group's smallest index is its first path: the table is sorted


def _near_duplicate_rows(fixed: list[tuple], lookalikes, unmoved: dict[str, str]) -> list[tuple]:
    """near_duplicates.csv: each photo in a group that a lookalike pair joined (path, label, split,
    the group's first path, and the split the rule gave it if the group moved it, else "")."""
    first = _groups(fixed, lookalikes)
    position = {row[0]: index for index, row in enumerate(fixed)}
    joined = {first[position[a]] for a, *_ in lookalikes}
    rows = [
        (path, label, split, fixed[first[index]][0], "" if unmoved[path] == split else unmoved[path])
        for index, (path, label, split, _) in enumerate(fixed)
        if first[index] in joined
    ]
    return sorted(rows, key=lambda row: (row[3], row[0]))


def split_dataset(
    root: Path,
    split_csv: Path,
    rejected_csv: Path,
    *,
    base_dir: Path,
    validation_percentage: float,
    testing_percentage: float,
    min_images_per_class: int,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    duplicates_csv: Path | None = None,
    layout: str = "folders",
    labels: str | None = None,
    split: str = "hash",
    exclude: Path | None = None,
    near_duplicate_distance: int | None = None,
    near_duplicates_csv: Path | None = None,
) -> dict[str, int]:
    """The split stage: list and check `root`, write rejected.csv, split.csv and duplicates.csv.

    layout "folders" (labels: a CSV in root, or None for class folders) or "oxford102"; split
    "hash" (retrain.py's rule) or "official" (the dataset's own, oxford102 only). `exclude`: a
    path,reason CSV (`retrain.exclusions`) of photos to leave out, listed in rejected.csv.
    near_duplicate_distance: photos whose perceptual hashes differ in at most this many bits
    share a split (None: only identical files do). Returns the counts.
    """
    listing = list_dataset(root, layout=layout, labels=labels, official_split=split == "official")
    candidates, rejected = _without_excluded(listing.candidates, listing.rejected, exclude, Path(base_dir))
    rows, rejected = check_files(candidates, rejected, max_image_pixels=max_image_pixels)
    lookalikes = []
    if near_duplicate_distance is not None:
        hashes = perceptual_hashes([row.path for row in rows])
        lookalikes = [(rows[i].path, rows[j].path, d) for i, j, d in near_pairs(hashes, near_duplicate_distance)]
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
        lookalikes=lookalikes,
        near_duplicates_csv=near_duplicates_csv,
    )


def _without_excluded(candidates: list, rejected: list, exclude: Path | None, base_dir: Path) -> tuple[list, list]:
    """Move the candidates that the exclusion CSV names (paths relative to base_dir) to rejected.

    A listed path that matches no candidate is an error: a typo would otherwise leave in a photo
    someone decided to take out.
    """
    if exclude is None:
        return candidates, rejected
    excluded = read_exclusions(exclude)
    kept, rejected = [], list(rejected)
    for path, label in candidates:
        reason = excluded.pop(_relative_posix(path, base_dir), None)
        if reason is None:
            kept.append((path, label))
        else:
            rejected.append(Rejection(path, exclusion_reason(exclude, reason)))
    if excluded:
        unknown = sorted(excluded)
        raise RetrainError(
            f"{exclude}: {len(unknown)} path{'s' * (len(unknown) != 1)} match no image of the dataset (first: {unknown[0]}); "
            "paths are as split.csv writes them (e.g. data/raw/<name>/<class>/<image>): fix or remove those lines"
        )
    return kept, rejected


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
        raise RetrainError(
            f"{root / source}: lists {len(classes)} class{'es' * (len(classes) != 1)}; a classifier needs at least two"
        )
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
            elif not _is_utf8(name):
                rejected.append(
                    Rejection(Path(dirpath, _shown(name)), "folder name is not valid UTF-8, skipped; rename it")
                )
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d) and _is_utf8(d))
        for name in sorted(filenames):
            if _is_hidden(name):
                rejected.append(Rejection(Path(dirpath, name), "hidden file, skipped"))
            elif not _is_utf8(name):  # it could be written to no CSV: named with \x escapes instead
                rejected.append(
                    Rejection(Path(dirpath, _shown(name)), "file name is not valid UTF-8, skipped; rename it")
                )
            else:
                candidates.append((Path(dirpath, name), label))


def _is_utf8(name: str) -> bool:
    """False for a name in another encoding (os.listdir gives its bytes as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(name: str) -> str:
    return os.fsencode(name).decode("utf-8", "backslashreplace")


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
        decode_image(data, max_image_pixels)
    except ImageError:
        return f"truncated {fmt}" if _looks_truncated(fmt, data) else f"corrupt {fmt} (cannot be decoded)"
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
