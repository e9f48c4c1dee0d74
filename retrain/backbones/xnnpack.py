"""XNNPACK through the TFLite interpreter: the runtime that computes cached features.

TensorFlow reached 0.4-0.5 of this machine's FLOP limit on the embedded EfficientNet-Lite, the
TFLite interpreter with XNNPACK 0.7-0.8 (issue #17). So a backbone's loop-free `single_pass` graph
(or its `__call__` where it has none) is converted once to a .tflite file, cached beside the
converted SavedModels as `backbones_root()/<weights id>-xnnpack-r<version>.tflite`, and only
kept when its features match TensorFlow's within `TOLERANCE` on a check batch. A module that does
not convert (or does not match) is remembered in a `.failed` file beside it, and the caller falls
back to the SavedModel. Fine-tuning and export keep TensorFlow: only feature extraction runs here.

The interpreter comes from `ai-edge-litert` (its import costs 0.07 s, no TensorFlow); converting
and checking (`retrain.tf.backbones.to_tflite`) is the only part that loads TensorFlow.
"""

import hashlib
import importlib.metadata
import os
import sys
from pathlib import Path

import numpy as np

from retrain.atomic import atomic_file
from retrain.cache import backbones_root

# Bump when the conversion or the way `Extractor` runs it changes what comes out.
RUNTIME_VERSION = "1"
TOLERANCE = 1e-4  # max abs feature difference from TensorFlow's for the conversion to be used
# One image per invoke: on 2 cores batch 1 beat batches of 8 and 32 (issue #17; benchmarks/README.md).
INVOKE_BATCH = 1
THREADS = os.cpu_count() or 1  # the local engine's: every core; Ray's actors pass their own count


def tflite_path(weights_id: str) -> Path:
    return backbones_root() / f"{weights_id}-xnnpack-r{RUNTIME_VERSION}.tflite"


def _failed_path(weights_id: str) -> Path:
    """Where a failed conversion is remembered: per TensorFlow version, so an upgrade tries again."""
    return tflite_path(weights_id).with_suffix(f".tf{_tensorflow_version()}.failed")


def _tensorflow_version() -> str:
    for package in ("tensorflow-cpu", "tensorflow"):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "none"


def converted(backbone) -> Path | None:
    """The backbone's checked .tflite file, converting it on first use; None (with one line on
    stderr saying why) when it does not convert or does not reproduce TensorFlow's features."""
    path = tflite_path(backbone.weights_id)
    if path.is_file():
        return path
    failed = _failed_path(backbone.weights_id)
    if failed.is_file():
        _say_fallback(backbone, failed.read_text(encoding="utf-8").strip())
        return None
    from retrain.tf.backbones import to_tflite

    try:
        model = to_tflite(backbone, INVOKE_BATCH)
        difference = _max_difference(model, backbone)
        if not difference <= TOLERANCE:
            raise ValueError(f"its features differ from TensorFlow's by {difference:.2g} > {TOLERANCE:g}")
    except _OUR_BUGS:
        raise  # a fault of this code must not be remembered as "this module does not convert"
    except Exception as e:  # the converter raises many other types; any of them means "use TensorFlow"
        reason = _first_line(e)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(failed, reason.encode())
        _say_fallback(backbone, reason)
        return None
    _write_atomically(path, model)
    return path


_OUR_BUGS = (NameError, AttributeError, ImportError, AssertionError)


def _say_fallback(backbone, reason: str) -> None:
    print(
        f"backbone {backbone.name}: no XNNPACK conversion ({reason}); features run on the SavedModel in TensorFlow",
        file=sys.stderr,
    )


def _max_difference(model: bytes, backbone) -> float:
    """Max abs difference between the converted model's and TensorFlow's features on 4 images."""
    images = np.random.default_rng(0).random((4, *backbone.image_size, 3), dtype=np.float32)
    ours = Extractor(model_content=model).features(images)
    theirs = backbone.features(images).numpy()  # the module's own features, in TensorFlow
    if ours.shape != theirs.shape:
        raise ValueError(f"converted model gives {ours.shape} features, TensorFlow {theirs.shape}")
    return float(np.max(np.abs(ours - theirs)))


def interpreter_class():
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter


def interpreter(**options):
    """A LiteRT interpreter (model_path or model_content, num_threads), tensors allocated, made
    without its "Created TensorFlow Lite XNNPACK delegate" line."""
    from retrain.native_log import filtered_stderr

    with filtered_stderr():
        made = interpreter_class()(**options)
        made.allocate_tensors()
    return made


class Extractor:
    """float32 [N, H, W, 3] in [0, 1] → float32 [N, D] through one XNNPACK interpreter.

    Not thread-safe: one caller at a time (the bottlenecks loop is one thread).
    """

    def __init__(self, model_path: Path | None = None, model_content: bytes | None = None, threads: int = THREADS):
        source = {"model_path": str(model_path)} if model_path is not None else {"model_content": model_content}
        self._interpreter = interpreter(**source, num_threads=threads)
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]

    def features(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        rows = []
        for start in range(0, len(images), INVOKE_BATCH):
            self._interpreter.set_tensor(self._input, images[start : start + INVOKE_BATCH])
            self._interpreter.invoke()
            rows.append(self._interpreter.get_tensor(self._output))
        return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


def runtime_id(weights_id: str) -> str:
    """The backbone id of features computed here: they differ from TensorFlow's at 1e-5."""
    return hashlib.sha256(f"{weights_id}|xnnpack-r{RUNTIME_VERSION}".encode()).hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    with atomic_file(path) as temp:  # a killed conversion leaves no half model
        temp.write_bytes(data)


def _first_line(error) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__
