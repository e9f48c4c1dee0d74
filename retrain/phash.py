"""Perceptual hashes: photos that look the same, found before any feature is computed.

Split keeps identical files (same sha256) in one split; burst shots, resized or re-encoded copies
differ in bytes but not to the eye, and one in train with its twin in test leaks too. Split cannot
see backbone features, so it hashes what a photo looks like: `perceptual_hash` is imagehash's
pHash (DCT of a 32x32 grey thumbnail, 64 bits), and two photos whose hashes differ in at most
`data.near_duplicate_distance` bits are one group.

Measured on the 2,400 shared flower photos at distance 6: 14 pairs, every one a true duplicate by
eye, 4 of them across splits. 8 of them are among the 14 pairs whose EfficientNet-Lite0 features
have cosine >= 0.93 (all 4 at >= 0.99); the other 6 are colour-edited or greyscale copies, which
features rate below 0.93 (they see colour; the hash is grey). At 10 bits, unrelated photos of
other classes start to pair up. What it misses: burst shots with the camera moved, or a copy
cropped (8-30 bits apart, cosine 0.93-0.97), which only the data report's feature similarity
finds; it lists those pairs, and those across splits, for a person to exclude one of each.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

DRAFT_PIXELS = 64  # JPEGs decode at 1/2..1/8 scale to at least this: the hash needs 32x32, not megapixels
_CHUNK = 1024  # rows of the pairwise distance matrix held at once (1024 x N uint8)


def perceptual_hash(path: Path) -> int | None:
    """The 64-bit pHash of the image at `path` as an int (EXIF orientation ignored, as pHash does);
    None if PIL cannot read it (split has accepted it already: it is then only never grouped)."""
    try:
        with Image.open(path) as image:
            image.draft("L", (DRAFT_PIXELS, DRAFT_PIXELS))  # a no-op for formats other than JPEG
            bits = imagehash.phash(image).hash.flatten()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return int("".join("1" if bit else "0" for bit in bits), 2)


def perceptual_hashes(paths: list[Path], workers: int | None = None) -> list[int | None]:
    """`perceptual_hash` of each path, in order; PIL releases the GIL while decoding."""
    with ThreadPoolExecutor(workers or 2 * (os.cpu_count() or 1)) as pool:
        return list(pool.map(perceptual_hash, paths))


def near_pairs(hashes: list[int | None], max_distance: int) -> list[tuple[int, int, int]]:
    """(i, j, bits that differ) for every i < j whose hashes differ in at most max_distance bits
    (a None hash pairs with nothing).

    Brute force over all pairs, in chunks: 2,400 photos take milliseconds, 100,000 some seconds.
    """
    known = [i for i, value in enumerate(hashes) if value is not None]
    values = np.array([hashes[i] for i in known], dtype=np.uint64)
    found = []
    for start in range(0, len(values), _CHUNK):
        block = values[start : start + _CHUNK]
        distance = np.bitwise_count(block[:, None] ^ values[None, :])
        rows, columns = np.nonzero(distance <= max_distance)
        for row, column in zip(rows.tolist(), columns.tolist()):
            if start + row < column:
                found.append((known[start + row], known[column], int(distance[row, column])))
    return found


def connected_groups(count: int, pairs) -> list[int]:
    """Group index of each of `count` items, linking every (i, j, ...) in pairs (union-find).

    A group's index is its smallest member, so groups are stable under any order of pairs.
    """
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, *_ in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [root(i) for i in range(count)]
