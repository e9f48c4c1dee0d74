"""Files and folders written whole or not at all, so a killed stage never leaves half an output behind."""

import contextlib
import os
import shutil
import tempfile
import uuid
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
    """Yield an unused temporary path beside `path` (its folder must exist); create and write it. On
    success it replaces `path`; on any error (or Ctrl-C) it is removed and `path` is left as it was.

    The writer creates the file, so it gets the usual permissions (umask), not mkstemp's 0600.
    """
    path = Path(path)
    temp = path.with_name(f".tmp-{uuid.uuid4().hex}{suffix}")
    try:
        yield temp
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
