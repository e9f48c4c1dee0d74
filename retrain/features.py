"""Bottlenecks: backbone features per image, computed once and cached by content.

`FeatureCache` stores one float32 vector per (backbone id, preprocessing version, image sha256)
as a small .npy file, written to a temporary name and renamed, so a killed run never leaves a
half-written entry and a damaged one is detected and recomputed. `fill_missing` finds the entries
the cache lacks, counts them, and hands just those to an engine: `compute_locally` here (or
`retrain.ray_engine`'s), which runs them through `image_batches`, the one image pipeline (read,
decode, optional augmentation and resize on a thread per core, `retrain.images`' decoder), then
the backbone on its runtime (XNNPACK where it converts), with cache writes on a background
thread. No TensorFlow. `write_split_arrays` then gathers the per-split arrays the train and
evaluate stages read, streamed row by row from the cache to disk.
"""

import csv
import hashlib
import io
import os
import tempfile
import time
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from retrain.atomic import atomic_file
from retrain.errors import RetrainError
from retrain.images import PREPROCESSING_VERSION, ImageError, decode_image, resize_image
from retrain.paths import SPLITS


@dataclass(frozen=True)
class Example:
    """One row of split.csv: an image path (relative to the project root), its class and split."""

    path: str
    label: str
    split: str
    sha256: str


def read_split(path: Path) -> list[Example]:
    """The rows of data/split.csv, in file order."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return [Example(r["path"], r["label"], r["split"], r["sha256"]) for r in csv.DictReader(handle)]
    except FileNotFoundError:
        raise RetrainError(f"{path}: not found; run the split stage first (dvc repro split)") from None
    except KeyError as missing:
        raise RetrainError(f"{path}: column {missing} missing; rerun the split stage") from None


def dataset_hash(examples: list[Example]) -> str:
    """sha256 of the whole labelled, split dataset: equal hashes mean the same images and labels."""
    digest = hashlib.sha256()
    for e in sorted(examples, key=lambda e: e.path):
        digest.update(f"{e.path}\t{e.label}\t{e.split}\t{e.sha256}\n".encode())
    return digest.hexdigest()


def class_names(examples: list[Example]) -> list[str]:
    """Labels in index order: sorted, so the same folders always give the same indices."""
    return sorted({example.label for example in examples})


# Bump when an entry's layout changes: part of the cache folder's name.
ENTRY_VERSION = "2"  # 2: each entry ends with the sha256 of its key and vector


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class FeatureCache:
    """Content-addressed feature vectors of one backbone: root/<backbone id>/p<version>-e<entry version>/ab/<sha>.npy

    An entry is a .npy header, D float32s, then sha256(key, vector): `get` returns a vector only
    when the digest matches, so a damaged entry, or one copied or renamed over another key's (a
    teammate's mistake in a shared cache), is recomputed instead of trained or tested on. Entries
    and folders get the user's umask, so a team sharing the folder (umask 002, one group) reads
    each other's entries instead of recomputing them.
    """

    def __init__(self, root: Path, backbone_id: str, feature_dim: int):
        self.root, self.backbone_id, self.feature_dim = Path(root), backbone_id, feature_dim
        self.folder = self.root / backbone_id / f"p{PREPROCESSING_VERSION}-e{ENTRY_VERSION}"
        # Every entry is the same .npy header followed by D float32s and a digest: writing and
        # checking those bytes directly is several times cheaper than np.save/np.load.
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(feature_dim, np.float32), allow_pickle=False)
        self._header = buffer.getvalue()[: -4 * feature_dim]
        self._size = len(self._header) + 4 * feature_dim + 32
        self._mode = 0o666 & ~_umask()
        self._made_dirs = set()

    def __reduce__(self):
        """Pickled as its arguments (the Ray engine sends the cache to its actors): each process
        rebuilds it with its own umask and folder memo."""
        return FeatureCache, (self.root, self.backbone_id, self.feature_dim)

    def path(self, sha256: str) -> Path:
        return self.folder / sha256[:2] / f"{sha256}.npy"

    def has(self, sha256: str) -> bool:
        """Whether a whole entry is there: one stat, no read (reading all 2,400 entries before
        computing was most of a warm run's work). Entries are renamed into place, so a complete
        size means a complete write; `get` checks the bytes when they are used."""
        try:
            return self.path(sha256).stat().st_size == self._size
        except OSError:
            return False

    @staticmethod
    def _digest(key: str, vector_bytes: bytes) -> bytes:
        return hashlib.sha256(key.encode() + b"\0" + vector_bytes).digest()

    def get(self, sha256: str) -> np.ndarray | None:
        """The cached vector, or None when absent, damaged or not this key's (such an entry is removed)."""
        path = self.path(sha256)
        try:
            with open(path, "rb") as handle:
                data = handle.read(self._size + 1)
        except FileNotFoundError:
            return None
        except OSError:
            return None
        body = data[len(self._header) : len(self._header) + 4 * self.feature_dim]
        if len(data) == self._size and data.startswith(self._header) and data[-32:] == self._digest(sha256, body):
            return np.frombuffer(body, "<f4").astype(np.float32)
        path.unlink(missing_ok=True)
        return None

    def put(self, sha256: str, vector: np.ndarray) -> None:
        """Store atomically: a reader sees the whole entry or none."""
        vector = np.asarray(vector, dtype="<f4")
        if vector.shape != (self.feature_dim,):
            raise ValueError(f"feature vector of shape {vector.shape}, expected ({self.feature_dim},)")
        path = self.path(sha256)
        if path.parent not in self._made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made_dirs.add(path.parent)
        # Not atomic_file: this runs once per image, and writing through mkstemp's own descriptor
        # instead of reopening the file by name took 2,400 puts from 0.7-1.1 s to 0.18-0.34 s.
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
        try:
            os.fchmod(handle, self._mode)  # mkstemp makes it 0600: the umask decides, as for any file
            with os.fdopen(handle, "wb") as out:
                body = vector.tobytes()
                out.write(self._header + body + self._digest(sha256, body))
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


# Decoding runs on a thread per core (Pillow and numpy release the GIL), two batches ahead of the
# model: it is the slow side, and a fixed depth keeps memory flat.
DECODE_THREADS = os.cpu_count() or 1
PREFETCH_BATCHES = 2


def image_batches(paths, image_size, batch_size: int, transform=None, seeds=None, extra=(), threads=None):
    """The one image pipeline: yields (float32 [B, H, W, 3] images in [0, 1], *extra columns' values).

    Every image → model path (bottlenecks, augmented views, fine-tuning, its validation, Ray
    actors) runs here, so a speed fix lands everywhere at once. Order is kept. transform: None, or
    a function (uint8 [H, W, 3] image, int32 [2] seed) → uint8 image applied before the resize
    (augmentation), given seeds[i] for image i. extra: more per-image columns passed through
    (cache keys, labels), as numpy arrays per batch. threads: decoding threads (None:
    `DECODE_THREADS`). A file that changed since split must not stop the whole run: it is
    skipped, so its row simply never arrives.
    """
    paths = [str(p) for p in paths]
    seeds = np.zeros((len(paths), 2), np.int32) if seeds is None else np.asarray(seeds, np.int32).reshape(-1, 2)
    columns = [np.asarray(column) for column in extra]
    size = tuple(image_size)

    def load(i):
        try:
            with open(paths[i], "rb") as handle:
                image = decode_image(handle.read())
            if transform is not None:
                image = transform(image, seeds[i])
            return resize_image(image, size)
        except (ImageError, OSError):
            return None

    with ThreadPoolExecutor(threads or DECODE_THREADS) as pool:
        upcoming, pending, rows, images = iter(range(len(paths))), deque(), [], []
        for i in upcoming:
            pending.append((i, pool.submit(load, i)))
            if len(pending) >= batch_size * PREFETCH_BATCHES:
                break
        while pending:
            i, loading = pending.popleft()
            if (following := next(upcoming, None)) is not None:
                pending.append((following, pool.submit(load, following)))
            if (image := loading.result()) is None:
                continue
            images.append(image)
            rows.append(i)
            if len(images) == batch_size:
                yield (np.stack(images), *(column[rows] for column in columns))
                rows, images = [], []
        if images:
            yield (np.stack(images), *(column[rows] for column in columns))


def compute_features(examples: list[Example], backbone, cache: FeatureCache, batch_size: int, engine=None) -> dict:
    """Fill the cache for every example it lacks, on `engine` (see `fill_missing`); return counts and images/s.

    Each distinct image content is computed once, however many rows share it.
    """
    entries = ((e.sha256, e.path, (0, 0)) for e in examples)
    run = fill_missing(entries, backbone, cache, batch_size, None, engine, "bottlenecks")
    return {"images": run.pop("entries"), **run}


def missing_entries(cache: FeatureCache, entries) -> dict[str, tuple[str, tuple[int, int]]]:
    """cache key → (image path, view seed) of the entries the cache lacks, each key once, in order.

    entries: (cache key, image path, view seed) per row; rows sharing a key are one entry.
    """
    missing = {}
    for key, path, seed in entries:
        if key not in missing and not cache.has(key):
            missing[key] = (path, seed)
    return missing


def fill_missing(entries, backbone, cache: FeatureCache, batch_size: int, transform=None, engine=None, desc="") -> dict:
    """Have `engine` compute the entries (see `missing_entries`) the cache lacks; counts and timing.

    An engine is called `engine(missing, backbone, cache, batch_size, transform, desc)` with only
    the missing entries, writes their vectors into `cache`, and returns {"computed": vectors
    written, ...its own stats}; None is `compute_locally`. Returns {"entries", "cache_hits",
    "computed", "seconds", "images_per_second", ...the engine's stats}.
    """
    entries = list(entries)
    missing = missing_entries(cache, entries)
    started = time.perf_counter()
    run = (engine or compute_locally)(missing, backbone, cache, batch_size, transform, desc) if missing else {}
    seconds = time.perf_counter() - started
    computed = run.pop("computed", 0)
    return {
        "entries": len(entries),
        "cache_hits": len(entries) - len(missing),
        "computed": computed,
        "seconds": round(seconds, 3),
        "images_per_second": round(computed / seconds, 2) if computed else 0.0,
        **run,
    }


def compute_locally(
    missing: dict, backbone, cache: FeatureCache, batch_size: int, transform, desc: str, threads=None
) -> dict:
    """The local engine: the missing images (key → (path, view seed)) through `image_batches`, on
    `threads` decoding threads (None: one per core), into `fill_cache`. Ray's actors run it too."""
    paths, seeds = zip(*missing.values())
    batches = image_batches(paths, backbone.image_size, batch_size, transform, seeds, [list(missing)], threads)
    return {"computed": fill_cache(batches, backbone, cache, len(missing), desc)}


def fill_cache(batches, backbone, cache: FeatureCache, total: int, desc: str) -> int:
    """Run the backbone over batches of (images [B,H,W,3], cache keys [B]) and store every vector.

    Cache writes run on a background thread, overlapped with the next batch's inference.
    Returns how many vectors were computed.
    """
    computed, writing = 0, None
    with ThreadPoolExecutor(max_workers=1) as writer, tqdm(total=total, unit="img", desc=desc, mininterval=1.0) as bar:
        for images, keys in batches:
            # On the backbone's runtime (XNNPACK where it converts, else TensorFlow).
            vectors = backbone.extract(images)
            if writing is not None:  # a failed write (a full disk) must stop the stage, not vanish
                writing.result()
            writing = writer.submit(_put_batch, cache, [str(key) for key in keys], vectors)
            bar.update(len(vectors))
            computed += len(vectors)
        if writing is not None:
            writing.result()
    return computed


def _put_batch(cache: FeatureCache, shas: list[str], vectors: np.ndarray) -> None:
    for sha, vector in zip(shas, vectors):
        cache.put(sha, vector)


def write_split_arrays(examples: list[Example], cache: FeatureCache, out_dir: Path) -> dict[str, int]:
    """Write out_dir/<split>.npz (features float32 [N,D], labels int32 [N], paths) and labels.txt."""
    names = class_names(examples)
    index = {name: i for i, name in enumerate(names)}
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        rows = [e for e in examples if e.split == split]
        write_features_npz(
            out_dir / f"{split}.npz",
            (cached_vector(cache, e.sha256, f"{e.path}: {CHANGED}") for e in rows),
            (len(rows), cache.feature_dim),
            labels=np.array([index[e.label] for e in rows], dtype=np.int32),
            paths=np.array([e.path for e in rows], dtype=str),
        )
        counts[split] = len(rows)
    (out_dir / "labels.txt").write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    return counts


CHANGED = "could not be decoded now though split accepted it; did it change? rerun `dvc repro`"


def cached_vector(cache: FeatureCache, key: str, error: str) -> np.ndarray:
    """The cached vector of key; RetrainError(error) when the cache lacks it (its image failed to decode)."""
    vector = cache.get(key)
    if vector is None:
        raise RetrainError(error)
    return vector


def write_features_npz(path: Path, vectors, shape: tuple[int, int], **arrays: np.ndarray) -> None:
    """Write path as np.savez would (`features` float32 `shape`, then `arrays`), atomically and streamed.

    `vectors` yields the rows of `features` one at a time: each goes straight to the file, so memory
    holds one row, not the whole array plus np.savez's 16 MiB copy buffers. A killed or failed write
    leaves the previous file (or none), never half of one.
    """
    with atomic_file(path, ".npz") as temp, zipfile.ZipFile(temp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("features.npy", "w", force_zip64=True) as out:
            header = {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)}
            np.lib.format.write_array_header_1_0(out, header)
            written = 0
            for vector in vectors:
                out.write(np.asarray(vector, dtype="<f4").reshape(shape[1]).tobytes())
                written += 1
            if written != shape[0]:
                raise ValueError(f"{path}: {written} feature rows written, {shape[0]} expected")
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.asanyarray(array), allow_pickle=False)


def load_split_arrays(features_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features float32 [N,D], labels int32 [N], paths) of one split."""
    path = Path(features_dir) / f"{split}.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["features"], data["labels"], [str(p) for p in data["paths"]]
    except FileNotFoundError:
        raise RetrainError(f"{path}: not found; run the bottlenecks stage first") from None


def load_labels(features_dir: Path) -> list[str]:
    """The class names of labels.txt, one a line ("\\n" only: split refuses labels holding any line break)."""
    path = Path(features_dir, "labels.txt")
    try:
        return path.read_bytes().decode("utf-8").split("\n")[:-1]
    except FileNotFoundError:
        raise RetrainError(f"{path}: not found; run the bottlenecks stage first (dvc repro bottlenecks)") from None
