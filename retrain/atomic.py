"""Files and folders written whole or not at all, so a killed stage never leaves half an output behind."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield an empty temporary folder beside `path`; fill it. On success it replaces `path` whole;
    on any error (or Ctrl-C) it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    try:
        yield temp
        if path.exists():
            shutil.rmtree(path)
        temp.rename(path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: Path, suffix: str = ""):
    """Yield a temporary file's path beside `path` (its folder must exist); write it. On success it
    replaces `path`; on any error (or Ctrl-C) it is removed and `path` is left as it was."""
    path = Path(path)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=suffix)
    os.close(handle)
    try:
        yield Path(temp)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
