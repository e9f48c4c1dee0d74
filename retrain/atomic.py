"""Files and folders written whole or not at all, so a killed stage never leaves half an output behind.

Both helpers give their output the usual permissions (the umask's), like any file a stage writes,
and name the output in a full-disk error that would otherwise not say which file it was writing.
"""

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from retrain.errors import NO_SPACE_ERRNOS


def _umask() -> int:
    """The process umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _naming_a_full_disk(path: Path):
    """A write that fails for lack of space often reports no file name: name the output."""
    try:
        yield
    except OSError as error:
        if error.errno in NO_SPACE_ERRNOS and not error.filename:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield an empty temporary folder beside `path`; fill it. On success it replaces `path` whole;
    on any error (or Ctrl-C) it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    try:
        with _naming_a_full_disk(path):
            yield temp
        os.chmod(temp, 0o777 & ~_umask())  # mkdtemp's 0700 would make model/ private to its owner
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
        with _naming_a_full_disk(path):
            yield temp
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
