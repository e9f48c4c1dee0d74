"""The one error type a user sees, and the top-level handler that prints it.

A `RetrainError` carries a single line that names the file, key or URL at fault and what to do
about it. Stage scripts and the command line catch it at the top and print just that line (exit
status 1). A full disk (or a file-size limit) is not a bug either, and gets its own line naming
the file; anything else is a bug and keeps its traceback.
"""

import errno
import os
import re

# A full disk, a full quota, a `ulimit -f` file-size limit: the user frees space and reruns.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class RetrainError(Exception):
    """A user-facing problem: one line, naming what is wrong and what to do."""


def no_space_message(error: BaseException) -> str | None:
    """The one line for a full disk or file-size limit ("disk full writing <path>: ..."), else None.

    Python reports one as an OSError with its errno; TensorFlow's writers (SavedModel, TFLite) as
    an OpError whose message is "<path>; No space left on device".
    """
    if isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS:
        too_large, where = error.errno == errno.EFBIG, error.filename
    else:
        match = re.search(r"(\S+); (No space left on device|File too large|Disk quota exceeded)", str(error))
        if match is None:
            return None
        too_large, where = match.group(2) == "File too large", match.group(1)
    where = where or _path_in_traceback(error.__traceback__) or "an output (the file name was not reported)"
    if too_large:
        return f"file too large writing {where} (a file-size limit, see `ulimit -f`): raise it and rerun; finished work is kept"
    return f"disk full writing {where}: free space and rerun; finished work is kept"


# Names the writers' frames give the file they write (ours, tarfile's, shutil's).
_PATH_LOCALS = ("path", "targetpath", "target", "dst", "temp", "part")


def _path_in_traceback(traceback) -> str | None:
    """The file a failed write was writing, when the OSError does not say (a write() never does):
    a path-like local of the innermost frame that has one."""
    frames = []
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    for frame in reversed(frames):
        for name in _PATH_LOCALS:
            value = frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and os.fspath(value):
                return os.fspath(value)
    return None


def exit_on_error(function):
    """Run a stage or command; a RetrainError or a full disk becomes one line on stderr and exit status 1,
    Ctrl-C one line and exit status 130.

    Ctrl-C must stop it even when it was started with SIGINT ignored, as a script's background job
    (`cmd &`) is, and Python then leaves it ignored: the stage ran to the end and exited 0.
    """
    import signal
    import sys
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return function()
    except RetrainError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except Exception as error:
        line = no_space_message(error)
        if line is None:
            raise  # a bug: keep the traceback
        print(f"error: {line}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun to go on", file=sys.stderr)
        sys.exit(130)
