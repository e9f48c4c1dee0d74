"""Where retrain keeps what it computes once: converted backbones and per-image features.

One root for both: `$RETRAIN_CACHE_DIR`, else `$XDG_CACHE_HOME/retrain`, else `~/.cache/retrain`.
It lives outside the repository on purpose: `dvc exp run --temp/--queue` works in a temporary
copy of the repo, and its runs must reuse the features the workspace already computed.

A team may share the root (features are data, checked on read). Converted backbones are not data:
a SavedModel runs its graph when used, so whoever can replace one runs code as the next user. They
live in `backbones_root()`, a folder of the current user's alone inside the root, and are loaded
only when that folder is theirs and nobody else can write to it.
"""

import os
from pathlib import Path

from retrain.errors import RetrainError


def cache_root() -> Path:
    """The cache folder (not created here)."""
    if os.environ.get("RETRAIN_CACHE_DIR"):
        return Path(os.environ["RETRAIN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "retrain"


def backbones_root() -> Path:
    """cache_root()/backbones/u<uid>: this user's converted backbones, .tflite files and memos.

    Created private (0700). RetrainError in one line when it belongs to another user or others can
    write to it: nothing is loaded from a folder someone else controls.
    """
    uid = os.getuid()
    folder = cache_root() / "backbones" / f"u{uid}"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        status = folder.stat()
    except OSError as error:
        raise RetrainError(
            f"{folder}: cannot create the backbone cache folder ({error.strerror}); "
            "set RETRAIN_CACHE_DIR to a writable folder"
        ) from None
    if status.st_uid != uid or status.st_mode & 0o022:
        raise RetrainError(
            f"{folder}: owned by uid {status.st_uid} or writable by others, so its backbones could "
            f"run another user's code; remove it (it is rebuilt) or make it yours alone (chmod 700)"
        )
    return folder
