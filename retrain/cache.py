"""Where retrain keeps what it computes once: converted backbones and per-image features.

One root for both: `$RETRAIN_CACHE_DIR`, else `$XDG_CACHE_HOME/retrain`, else `~/.cache/retrain`.
It lives outside the repository on purpose: `dvc exp run --temp/--queue` works in a temporary
copy of the repo, and its runs must reuse the features the workspace already computed.
"""

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder (not created here)."""
    if os.environ.get("RETRAIN_CACHE_DIR"):
        return Path(os.environ["RETRAIN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "retrain"
