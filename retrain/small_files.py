"""Files the pipeline reads whole (params.yaml, a labels CSV, a label map, Oxford's .mat files).

Each is small by nature, so each is read through `read_capped`: a regular file of at most
`MAX_SMALL_FILE_BYTES` (or the caller's limit), else one line naming the file. A FIFO or a
device (`/dev/zero`) is refused without reading a byte, so nothing waits forever or fills memory.
"""

import os
import stat
from pathlib import Path

from retrain.errors import RetrainError
from retrain.limits import MAX_SMALL_FILE_BYTES


def read_capped(path, limit: int = MAX_SMALL_FILE_BYTES, what: str = "file") -> bytes:
    """The bytes of the regular file `path`, refused in one line if over `limit` bytes.

    Raises FileNotFoundError as open() does (callers word their own "not found"); any other
    problem is a RetrainError naming the file, its size and the limit.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO never waits
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RetrainError(f"{path}: cannot read {what} ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise RetrainError(f"{path}: not a regular file (a FIFO, device or folder); give the {what} itself")
        if info.st_size > limit:
            raise RetrainError(
                f"{path}: {info.st_size} bytes, over the {limit} byte limit for a {what}; is it the right file?"
            )
        data = f.read(limit + 1)  # the file may grow after fstat
    if len(data) > limit:
        raise RetrainError(f"{path}: over the {limit} byte limit for a {what}; is it the right file?")
    return data


def read_capped_text(path, limit: int = MAX_SMALL_FILE_BYTES, what: str = "file", encoding: str = "utf-8") -> str:
    """read_capped, decoded; a file that is not `encoding` text is one line naming it."""
    data = read_capped(path, limit, what)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise RetrainError(f"{path}: not {encoding} text (byte {e.start}); save the {what} as UTF-8") from None
