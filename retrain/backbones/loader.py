"""The one loader for every backbone: preset name, TF Hub handle or local SavedModel folder.

Whatever the source, the result is a `Backbone` that follows TF Hub's image feature-vector
convention: float32 images [N, H, W, 3] in [0, 1] at the module's size → float32 features [N, D].
The convention is checked at load time by running the module on a batch of two black images, so
a module that breaks it fails here, with a message, rather than deep inside a later stage (once
per module folder: the check and the id are memoised beside the converted backbones).
With `runtime="xnnpack"`, `Backbone.extract` runs the module's checked TFLite conversion
(`retrain.backbones.xnnpack`); `features` stays TensorFlow for fine-tuning and export.
A stage that only extracts features from a module already checked and converted loads no
TensorFlow: the memo gives the id and size, the .tflite file the features. Everything else
(`retrain.tf.backbones`) restores the module with `tf.saved_model.load` / `tensorflow_hub.load`,
never `hub.KerasLayer` (it fails under Keras 3).
"""

import functools
import hashlib
import json
import os

import numpy as np

from retrain.atomic import atomic_file
from retrain.backbones import efficientnet_lite, presets, xnnpack
from retrain.cache import backbones_root
from retrain.errors import RetrainError

# Part of every backbone id: bump when what `features` computes for the same weights changes.
BACKBONE_VERSION = "1"
DEFAULT_IMAGE_SIZE = (224, 224)
CONVENTION = "float32 [N,H,W,3] in [0,1] -> float32 [N,D]"


class Backbone:
    """A loaded feature extractor.

    name: what the user asked for (preset name, handle or folder).
    id: hex sha256 of the weights' content, `BACKBONE_VERSION`, the image size and, on XNNPACK,
        the runtime; the same on every machine and for every conversion of the same weights (the
        feature-cache key). weights_id: the same without the runtime.
    runtime: "xnnpack" (`extract` runs the TFLite conversion) or "tensorflow".
    image_size: (height, width) the module takes.
    feature_dim: D, the length of one feature vector.
    module: the object `tf.saved_model.load` / `hub.load` returned; trackable, so a new
        tf.Module can hold it as an attribute and `tf.saved_model.save` stores its variables.
    """

    def __init__(self, name, id, image_size, feature_dim, module, call, load=None):
        self.name = name
        self.id = id
        self.weights_id = id  # `id` before the runtime is added to it
        self.runtime = "tensorflow"
        self.image_size = tuple(image_size)
        self.feature_dim = int(feature_dim)
        self._module, self._call_module, self._load = module, call, load
        self._tflite = self._extractor = None

    @property
    def module(self):
        """The restored module, loaded on first use when the backbone came from the memo: a stage
        that extracts on XNNPACK never restores the SavedModel (0.5-0.8 s of its start-up)."""
        if self._module is None:
            from retrain.tf.backbones import feature_function

            self._module = self._load()
            self._call_module = feature_function(self.name, self._module)[0]
        return self._module

    def _call(self, images):
        self.module  # noqa: B018  (loads it on first use)
        return self._call_module(images)

    def on_xnnpack(self, tflite_path):
        """Extract with the checked .tflite conversion at tflite_path; the id names the runtime."""
        self._tflite, self.runtime = tflite_path, "xnnpack"
        self.id = xnnpack.runtime_id(self.weights_id)
        return self

    def extract(self, images) -> np.ndarray:
        """float32 [N, H, W, 3] in [0, 1] (array or Tensor) → float32 ndarray [N, feature_dim] on
        `runtime`: the features the cache keyed by `id` holds."""
        if self._tflite is None:
            return self._call(images).numpy()
        if self._extractor is None:  # made on first use: a stage with everything cached needs none
            self._extractor = xnnpack.Extractor(self._tflite)
        return self._extractor.features(np.asarray(images))

    def features(self, images):
        """float32 Tensor [N, H, W, 3] in [0, 1] → float32 Tensor [N, feature_dim].

        Plain TensorFlow ops: works eagerly and inside a caller's `tf.function`.
        """
        return self._call(images)

    def single_pass_features(self, images):
        """`features` as one loop-free graph (for TFLite), where the module offers one."""
        single_pass = getattr(self.module, "single_pass", None)
        return single_pass(images) if single_pass is not None else self._call(images)

    @property
    def trainable_variables(self):
        """The module's trainable variables (TF Hub convention), possibly empty."""
        return list(getattr(self.module, "trainable_variables", None) or [])

    def __repr__(self):
        return (
            f"Backbone(name={self.name!r}, image_size={self.image_size}, "
            f"feature_dim={self.feature_dim}, id={self.id[:12]}…)"
        )


def load_backbone(spec: str, image_size: tuple[int, int] | None = None, runtime: str = "tensorflow") -> "Backbone":
    """Load a backbone from a preset name, a TF Hub handle (URL) or a local SavedModel folder.

    spec: str. image_size: optional (height, width) for modules whose input size is not fixed
    (default: the preset's size, else 224x224); for fixed-size modules it must match or be None.
    runtime: "xnnpack" to extract features with the module's TFLite conversion (converted and
    checked once, then cached; a module that does not convert stays on "tensorflow", with one
    line saying so). Returns a `Backbone`; raises RetrainError with one line on anything a user
    can fix.
    """
    if runtime not in ("tensorflow", "xnnpack"):
        raise RetrainError(f"backbone runtime must be 'tensorflow' or 'xnnpack', got {runtime!r}")
    backbone = _load(spec, image_size)
    if runtime == "xnnpack" and (path := xnnpack.converted(backbone)) is not None:
        backbone.on_xnnpack(path)
    return backbone


def _load(spec, image_size):
    if not isinstance(spec, str) or not spec.strip():
        raise RetrainError(
            f"backbone name must be a preset, TF Hub URL or SavedModel folder, "
            f"got {spec!r}; presets: {', '.join(presets.names())}"
        )
    if image_size is not None:
        image_size = _check_image_size(spec, image_size)
    load, source, extra = _load_module(spec, image_size)
    # Validating the module on two images, hashing every weight and restoring it cost 0.9-1.2 s
    # of each stage's start-up: done once per module folder, then read from a memo.
    memo = _memo_path(source, image_size, extra)
    known = _read_memo(memo)
    if known:
        return Backbone(spec, known["id"], known["image_size"], known["feature_dim"], None, None, load)
    from retrain.tf.backbones import check_module

    module, call, size, feature_dim, id = check_module(spec, load, image_size, source, extra)
    if memo:
        memo.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(memo) as temp:
            temp.write_text(json.dumps({"feature_dim": feature_dim, "id": id, "image_size": size}), encoding="utf-8")
    return Backbone(spec, id, size, feature_dim, module, call)


def _read_memo(memo):
    try:
        known = json.loads(memo.read_text(encoding="utf-8")) if memo else None
        return {
            "id": str(known["id"]),
            "feature_dim": int(known["feature_dim"]),
            "image_size": tuple(int(v) for v in known["image_size"]),
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _memo_path(source, size, extra):
    """backbones_root()/ids/<digest of the module folder's files (path, size, mtime), the
    requested size, extra>.json, so a changed module is checked again; None without a folder."""
    folder = source if os.path.isdir(source) else presets.hub_cache_path(source)
    if not folder:
        return None
    digest = hashlib.sha256(f"{BACKBONE_VERSION}|{size}|{extra}|{os.path.abspath(folder)}".encode())
    for root, _dirs, files in sorted(os.walk(folder)):
        for name in sorted(files):
            stat = os.stat(os.path.join(root, name))
            digest.update(
                f"|{os.path.relpath(os.path.join(root, name), folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode()
            )
    return backbones_root() / "ids" / f"{digest.hexdigest()}.json"


def _load_module(spec, image_size=None):
    """(a function that loads the module, its source folder or handle, extra text for the id)."""
    if presets.is_embedded(spec):  # converted once per size: a fixed-size module, like a hub one
        folder = efficientnet_lite.convert(image_size=image_size, variant=spec)
        extra = f"{spec}-c{efficientnet_lite.CONVERTER_VERSION}"
        return functools.partial(_load_dir, spec, folder), folder, extra
    if spec in presets.PRESETS:
        handle = presets.PRESETS[spec].handle
        return functools.partial(_load_hub, handle), handle, ""
    if presets.is_url(spec):
        return functools.partial(_load_hub, spec), spec, ""
    folder = os.path.expanduser(spec)
    if os.path.isdir(folder):
        if not os.path.isfile(os.path.join(folder, "saved_model.pb")):
            raise RetrainError(
                f"{folder}: not a SavedModel folder (no saved_model.pb); "
                "backbone.name takes a preset, a TF Hub URL or a SavedModel folder"
            )
        return functools.partial(_load_dir, spec, folder), folder, ""
    raise RetrainError(
        f"backbone {spec!r} is no preset, URL or folder; presets: "
        f"{', '.join(presets.names())} (or a TF Hub URL or a SavedModel folder)"
    )


def _load_dir(spec, path):
    from retrain.tf.backbones import load_dir

    return load_dir(spec, path)


def _load_hub(handle):
    from retrain.tf.backbones import load_hub

    return load_hub(handle)


def _check_image_size(spec, image_size):
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        h = w = 0
    if h <= 0 or w <= 0:
        raise RetrainError(
            f"backbone {spec!r}: image_size must be two positive integers [height, width], got {image_size!r}"
        )
    return (h, w)


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else "no details"
