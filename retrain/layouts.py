"""Read the files that say which image has which label, for datasets that are not class folders.

Two layouts: a labels CSV (`path,label`, paths relative to the dataset root, `data.labels`) and
Oxford 102 Flowers as its authors publish it (`data.layout: oxford102`): `jpg/image_00001.jpg` …,
`imagelabels.mat` (the 1-based class of each image, in image-number order), `setid.mat` (the
official `trnid`/`valid`/`tstid` image numbers) and an optional names file (`label_map.json` or
`cat_to_name.json`, `{"1": "pink primrose", …}`). Both readers return the same `Labelled` table;
`retrain.split` compares it with the files on disk. A file that cannot be read as what it should
be stops the stage with one line naming the file and the fix: it is structure, not one bad image.
The download stage puts these files in the dataset folder: `fetch_extra_files` fetches each of
`data.extra_files` with the archive's machinery (cached, resumed, size-capped) and checks its own
sha256; `place_oxford_images` nests 102flowers.tgz's top folder `jpg/` inside that folder.
"""

import csv
import io
import json
import posixpath
import shutil
import struct
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from retrain import download
from retrain.errors import RetrainError
from retrain.limits import MAX_SMALL_FILE_BYTES
from retrain.small_files import read_capped, read_capped_text
from retrain.urls import without_credentials

OXFORD_LABELS = "imagelabels.mat"
OXFORD_SETS = "setid.mat"
OXFORD_NAMES = ("label_map.json", "cat_to_name.json")
# setid.mat's keys, in the order of our split names.
OXFORD_SPLIT_KEYS = {"trnid": "train", "valid": "validation", "tstid": "test"}


@dataclass(frozen=True)
class Labelled:
    """One image a label file lists: its path relative to the dataset root ("/"-separated),
    its class, its split when the dataset fixes one (else None), and where it was listed."""

    path: str
    label: str
    split: str | None
    where: str


# --- checking a class label ------------------------------------------------------------------


def label_problem(label: str) -> str | None:
    """Why `label` cannot be a class name, or None when it can.

    labels.txt holds one label a line and is read back with str.splitlines(), which also splits
    on \\r, \\v, \\f, \\x1c-\\x1e, \\x85, U+2028 and U+2029: a label holding one would become two and
    shift every later class. Control and format characters, surrounding spaces and text that is
    not valid Unicode (a folder name in another encoding) are refused for the same reason: a
    label must read back as itself from every file it is written to.
    """
    try:
        label.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 (a name from another encoding)"
    if not label:
        return "is empty"
    if label != label.strip():
        return "starts or ends with whitespace"
    for character in label:
        if len(f"a{character}b".splitlines()) > 1:
            return f"holds a line break ({ascii(character)})"
        if unicodedata.category(character) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            return f"holds the control or format character {ascii(character)}"
    return None


def check_label(label: str, where: str, fix: str) -> str:
    """`label` itself, or a RetrainError naming `where` it came from and the `fix`."""
    problem = label_problem(label)
    if problem:
        raise RetrainError(f"{where}: class name {shown_name(label)} {problem}; {fix}")
    return label


def shown_name(text: str) -> str:
    """A name quoted for one error line: escapes for line breaks and control characters, and the
    raw bytes (\\xff) of a name in another encoding, so the user can find the file."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return repr(text.encode("utf-8", "surrogateescape"))[1:] if _only_escaped_bytes(text) else ascii(text)
    return ascii(text) if label_problem(text) else repr(text)


def _only_escaped_bytes(text: str) -> bool:
    return all(not "\ud800" <= c <= "\udfff" or "\udc80" <= c <= "\udcff" for c in text)


# --- a labels CSV ------------------------------------------------------------------------------


def read_labels_csv(root: Path, name: str) -> list[Labelled]:
    """The rows of `root/name`, a CSV with a header naming (at least) the columns path and label."""
    path = Path(root, name)
    try:
        text = read_capped_text(path, what="labels CSV", encoding="utf-8-sig")  # -sig: spreadsheets write a BOM
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except FileNotFoundError:
        raise RetrainError(
            f"data.labels: {path} not found; put the labels CSV in the dataset folder or set data.labels: null"
        ) from None
    except (OSError, csv.Error) as e:
        raise RetrainError(f"data.labels: cannot read {path} ({e}); save it as UTF-8 CSV") from None
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    if "path" not in header or "label" not in header:
        raise RetrainError(
            f"{path}: the first line must name the columns path,label (got {','.join(header) or 'nothing'})"
        )
    at_path, at_label = header.index("path"), header.index("label")
    table = []
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank lines, e.g. at the end
        where = f"{name} line {number}"
        if len(row) <= max(at_path, at_label) or not row[at_label].strip():
            raise RetrainError(f"{path} line {number}: expected a path and a label, got {','.join(row)!r}")
        label = check_label(
            row[at_label].strip(),
            f"{path} line {number}",
            "rename the class in the CSV (one line, no control characters)",
        )
        table.append(Labelled(_relative_path(row[at_path], where), label, None, where))
    _check_unique(table, path)
    return table


def _relative_path(text: str, where: str) -> str:
    """A listed path as "a/b.jpg"; one that would leave the dataset folder is an error."""
    cleaned = posixpath.normpath(text.strip().replace("\\", "/"))
    if not text.strip() or cleaned.startswith("/") or cleaned == ".." or cleaned.startswith("../"):
        raise RetrainError(f"{where}: path {text!r} is not inside the dataset folder; give paths relative to it")
    return cleaned


def _check_unique(table: list[Labelled], source: Path) -> None:
    first = {}
    for entry in table:
        if entry.path in first:
            raise RetrainError(
                f"{source}: {entry.path} is listed twice ({first[entry.path]} and {entry.where}); keep one line"
            )
        first[entry.path] = entry.where


# --- Oxford 102 --------------------------------------------------------------------------------


def read_oxford102(root: Path, official_split: bool) -> list[Labelled]:
    """One entry per image of imagelabels.mat (jpg/image_NNNNN.jpg), split by setid.mat if asked.

    Labels are the names file's names when one is present, else class_001 …; with
    official_split, an image in none of setid's sets gets split None (split leaves it out).
    """
    root = Path(root)
    numbers = _mat_vector(root / OXFORD_LABELS, "labels")
    names = _class_names(root, sorted(set(numbers)))
    splits = _official_splits(root, len(numbers)) if official_split else {}
    return [
        Labelled(f"jpg/image_{i:05d}.jpg", names[label], splits.get(i), f"{OXFORD_LABELS} image {i}")
        for i, label in enumerate(numbers, start=1)
    ]


def _mat_vector(path: Path, key: str) -> list[int]:
    """The integer vector `key` of a MATLAB file (a 1xN or Nx1 matrix), as Python ints."""
    import numpy as np
    import scipy.io

    if not path.is_file():
        raise RetrainError(
            f"{path} not found; list it in data.extra_files (Oxford 102's {path.name}) or put it beside jpg/"
        )
    data = read_capped(path, MAX_SMALL_FILE_BYTES, what="MATLAB file")
    _check_mat_expansion(path, data)
    try:
        content = scipy.io.loadmat(io.BytesIO(data))
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError... on damaged files
        raise RetrainError(f"{path}: not a readable MATLAB file ({str(e)[:200]}); download it again") from None
    values = content.get(key)
    if values is None:
        found = ", ".join(k for k in content if not k.startswith("__"))[:200] or "none"
        raise RetrainError(f"{path}: no variable {key!r} (found: {found}); is this Oxford 102's {path.name}?")
    values = np.asarray(values)
    usable = (
        values.size > 0
        and values.dtype.kind in "iuf"
        and np.all(np.isfinite(values))
        and np.all(values == np.round(values))
        and values.min() >= 1
        and values.max() <= MAX_MAT_NUMBER
    )
    if not usable:
        raise RetrainError(
            f"{path}: {key!r} must be positive whole numbers (1-based, at most {MAX_MAT_NUMBER}), "
            f"got {values.dtype} {values.shape}; download it again"
        )
    return [int(v) for v in values.ravel()]


# Oxford 102 numbers 8,189 images and 102 classes; a number beyond this is damage, not a dataset.
MAX_MAT_NUMBER = 10_000_000


def _check_mat_expansion(path: Path, data: bytes) -> None:
    """Refuse a MATLAB v5 file whose compressed variables unpack to more than MAX_SMALL_FILE_BYTES.

    A few kB of zlib can hold a GiB of zeros, which scipy would unpack whole. The file is a
    128-byte header then tagged elements (type, byte count); type 15 is one zlib-compressed
    variable, unpacked here only up to the cap and never kept.
    """
    if len(data) < 128 or data[126:128] not in (b"IM", b"MI"):
        return  # not v5 (v4 is never compressed; anything else scipy refuses by itself)
    order = "<" if data[126:128] == b"IM" else ">"
    position, unpacked = 128, 0
    while position + 8 <= len(data):
        kind, size = struct.unpack(order + "II", data[position : position + 8])
        if kind == 15:
            inflater = zlib.decompressobj()
            try:
                unpacked += len(
                    inflater.decompress(data[position + 8 : position + 8 + size], MAX_SMALL_FILE_BYTES + 1 - unpacked)
                )
            except zlib.error:
                return  # damaged: scipy's own error names it
        else:
            unpacked += size
        if unpacked > MAX_SMALL_FILE_BYTES:
            raise RetrainError(
                f"{path}: its variables unpack to more than {MAX_SMALL_FILE_BYTES} bytes "
                "(Oxford 102's take 66 kB); download the file again"
            )
        position += 8 + size + (-size % 8 if kind != 15 else 0)


def _class_names(root: Path, numbers: list[int]) -> dict[int, str]:
    """Class number → name: from the names file when there is one, else class_001 …."""
    present = [root / name for name in OXFORD_NAMES if (root / name).is_file()]
    if not present:
        return {n: f"class_{n:03d}" for n in numbers}
    path = present[0]
    try:
        mapping = json.loads(read_capped_text(path, what="label map"))
    except (OSError, ValueError) as e:
        raise RetrainError(
            f"{path}: not readable JSON ({str(e)[:200]}); fix it or remove it to use class_001 … names"
        ) from None
    except RecursionError:
        raise RetrainError(
            f"{path}: JSON nested too deeply to be a label map; fix it or remove it to use class_001 … names"
        ) from None
    if not isinstance(mapping, dict):
        raise RetrainError(f'{path}: expected a JSON object like {{"1": "pink primrose"}}')
    missing = [
        n for n in numbers if not isinstance(mapping.get(str(n)), (str, int, float)) or not str(mapping[str(n)]).strip()
    ]
    if missing:
        raise RetrainError(
            f"{path}: no name for class {missing[0]} (of {len(missing)} missing); add it or remove the file"
        )
    names = {
        n: check_label(
            str(mapping[str(n)]).strip(), f"{path} class {n}", "fix that name (one line, no control characters)"
        )
        for n in numbers
    }
    clash = _first_repeat(list(names.values()))
    if clash:
        raise RetrainError(f"{path}: the name {clash!r} is given to two classes; names must be distinct")
    return names


def _first_repeat(values: list[str]) -> str | None:
    seen = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return None


def _official_splits(root: Path, count: int) -> dict[int, str]:
    """Image number → split from setid.mat; every number must be an image, in at most one set."""
    path = root / OXFORD_SETS
    splits = {}
    for key, split in OXFORD_SPLIT_KEYS.items():
        for number in _mat_vector(path, key):
            if number > count:
                raise RetrainError(f"{path}: {key!r} lists image {number}, but {OXFORD_LABELS} has {count} images")
            if number in splits:
                raise RetrainError(
                    f"{path}: image {number} is in two sets ({splits[number]} and {split}); the file is damaged"
                )
            splits[number] = split
    return splits


# --- fetching the label files ------------------------------------------------------------------


@without_credentials
def fetch_extra_files(files, dest: Path, cache_dir: Path, *, limits=None, **retry) -> list[Path]:
    """Put each of `files` (url, sha256: data.extra_files) at dest/<its URL's base name>.

    http(s) files are downloaded like the archive (cached, resumable, `limits` apply; `retry`:
    retries, backoff_s, timeout_s); a local path or file:// URL is copied. Each is checked
    against its own sha256 (None skips); a mismatch names the file, both digests and the key to set.
    """
    limits = limits or download.Limits()
    retry = {"retries": 4, "backoff_s": 1.0, "timeout_s": 30.0, **retry}
    placed = []
    for index, extra in enumerate(files):
        key = f"data.extra_files[{index}]"
        name = posixpath.basename(unquote(urlparse(extra.url).path).rstrip("/"))
        if not name or name.startswith(".") or dest / name in placed:
            raise RetrainError(f"{key}.url {extra.url!r}: needs a distinct, visible file name at the end of the URL")
        source = _extra_source(extra.url, key, cache_dir, limits, retry)
        downloaded = source.is_relative_to(cache_dir)
        if downloaded and extra.sha256 and download.file_sha256(source) != extra.sha256:
            # Maybe cached from an earlier, different file at that URL: fetch once more, then judge.
            source.unlink()
            source = _extra_source(extra.url, key, cache_dir, limits, retry)
        download.verify_sha256(source, extra.sha256, key=key, origin=extra.url, remove_on_mismatch=downloaded)
        shutil.copyfile(source, dest / name)
        placed.append(dest / name)
    return placed


def _extra_source(url: str, key: str, cache_dir: Path, limits, retry: dict) -> Path:
    """The file to copy: the verified cache entry of a URL, or the local file itself."""
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        # Checked by the caller against this file's own key, which the mismatch message names.
        return download._cached_download(
            url, None, Path(cache_dir), retry["retries"], retry["backoff_s"], retry["timeout_s"], limits
        )
    path = Path(url2pathname(unquote(urlparse(url).path))) if scheme == "file" else Path(url).expanduser()
    if not path.is_file():
        raise RetrainError(f"{key}.url {url!r}: {path} is not a file; give its URL or a local copy's path")
    return path


def place_oxford_images(root: Path) -> Path:
    """The Oxford 102 dataset folder holding jpg/: `root` itself, or, when the archive's one top
    folder was jpg/ (102flowers.tgz), a new `oxford102` folder beside it with jpg/ moved inside."""
    root = Path(root)
    if (root / "jpg").is_dir():
        return root
    if root.name != "jpg":
        raise RetrainError(
            f"{root}: no jpg/ folder; data.layout: oxford102 expects 102flowers.tgz (jpg/image_00001.jpg …)"
        )
    dataset = root.parent / "oxford102"
    shutil.rmtree(dataset, ignore_errors=True)
    dataset.mkdir()
    root.rename(dataset / "jpg")
    return dataset
