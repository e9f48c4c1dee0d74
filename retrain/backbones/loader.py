"""The one loader for every backbone: preset name, TF Hub handle or local SavedModel folder.

Whatever the source, the result is a `Backbone` that follows TF Hub's image feature-vector
convention: float32 images [N, H, W, 3] in [0, 1] at the module's size → float32 features [N, D].
The convention is checked at load time by running the module on a batch of two black images, so
a module that breaks it fails here, with a message, rather than deep inside a later stage (once
per module folder: the check and the id are memoised beside the converted backbones).
With `runtime="xnnpack"`, `Backbone.extract` runs the module's checked TFLite conversion
(`retrain.backbones.xnnpack`); `features` stays TensorFlow for fine-tuning and export.
Modules are loaded with `tf.saved_model.load` / `tensorflow_hub.load`, never `hub.KerasLayer`
(it fails under Keras 3).
"""

import functools
import hashlib
import json
import os

import numpy as np
import tensorflow as tf

from retrain.backbones import efficientnet_lite, presets, xnnpack
from retrain.atomic import atomic_file
from retrain.cache import cache_root
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
            self._module = self._load()
            self._call_module = _feature_function(self.name, self._module)[0]
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
        return (f"Backbone(name={self.name!r}, image_size={self.image_size}, "
                f"feature_dim={self.feature_dim}, id={self.id[:12]}…)")


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
    backbone = _load_tensorflow(spec, image_size)
    if runtime == "xnnpack" and (path := xnnpack.converted(backbone)) is not None:
        backbone.on_xnnpack(path)
    return backbone


def _load_tensorflow(spec, image_size):
    if not isinstance(spec, str) or not spec.strip():
        raise RetrainError(f"backbone name must be a preset, TF Hub URL or SavedModel folder, "
                           f"got {spec!r}; presets: {', '.join(presets.names())}")
    if image_size is not None:
        image_size = _check_image_size(spec, image_size)
    load, source, extra = _load_module(spec, image_size)
    # Validating the module on two images, hashing every weight and restoring it cost 0.9-1.2 s
    # of each stage's start-up: done once per module folder, then read from a memo.
    memo = _memo_path(source, image_size, extra)
    known = _read_memo(memo)
    if known:
        return Backbone(spec, known["id"], known["image_size"], known["feature_dim"], None, None, load)
    module = load()
    call, input_specs = _feature_function(spec, module)
    size = _resolve_image_size(spec, input_specs, image_size, presets.image_size(spec))
    feature_dim = _validate(spec, call, size)
    id = _backbone_id(spec, module, size, source, extra)
    if memo:
        memo.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(memo) as temp:
            temp.write_text(json.dumps({"feature_dim": feature_dim, "id": id, "image_size": size}), encoding="utf-8")
    return Backbone(spec, id, size, feature_dim, module, call)


def _read_memo(memo):
    try:
        known = json.loads(memo.read_text(encoding="utf-8")) if memo else None
        return {"id": str(known["id"]), "feature_dim": int(known["feature_dim"]),
                "image_size": tuple(int(v) for v in known["image_size"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _memo_path(source, size, extra):
    """cache_root()/backbones/ids/<digest of the module folder's files (path, size, mtime), the
    requested size, extra>.json, so a changed module is checked again; None without a folder."""
    folder = source if os.path.isdir(source) else presets.hub_cache_path(source)
    if not folder:
        return None
    digest = hashlib.sha256(f"{BACKBONE_VERSION}|{size}|{extra}|{os.path.abspath(folder)}".encode())
    for root, dirs, files in sorted(os.walk(folder)):
        for name in sorted(files):
            stat = os.stat(os.path.join(root, name))
            digest.update(f"|{os.path.relpath(os.path.join(root, name), folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_root() / "backbones" / "ids" / f"{digest.hexdigest()}.json"


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
            _load_dir(spec, folder)  # its one-line error, before a memo could be looked for
        return functools.partial(_load_dir, spec, folder), folder, ""
    raise RetrainError(f"backbone {spec!r} is no preset, URL or folder; presets: "
                       f"{', '.join(presets.names())} (or a TF Hub URL or a SavedModel folder)")


def _check_image_size(spec, image_size):
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        h = w = 0
    if h <= 0 or w <= 0:
        raise RetrainError(f"backbone {spec!r}: image_size must be two positive integers "
                           f"[height, width], got {image_size!r}")
    return (h, w)


def _load_dir(spec, path):
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise RetrainError(f"{path}: not a SavedModel folder (no saved_model.pb); "
                           "backbone.name takes a preset, a TF Hub URL or a SavedModel folder")
    try:
        return tf.saved_model.load(path)
    except Exception as e:  # TF raises many types for a corrupt model
        raise RetrainError(f"{path}: cannot load SavedModel ({type(e).__name__}: "
                           f"{_first_line(e)})") from None


def _load_hub(handle):
    cached = presets.hub_cache_path(handle)
    if not cached:
        presets.check_reachable(handle)
    import tensorflow_hub as hub  # only URL handles need it (it is slow to import)

    try:
        return hub.load(handle)
    except Exception as e:
        raise RetrainError(f"{handle}: cannot load TF Hub module ({type(e).__name__}: "
                           f"{_first_line(e)}); to use a local copy set "
                           "`backbone.name: /path/to/saved_model`") from None


def _feature_function(spec, module):
    """The module's features as a TF callable, and the TensorSpecs its image input accepts.

    Uses `module(images)` (TF2 hub modules, tf.Module exports), else the serving signature.
    """
    if callable(module):
        @tf.autograph.experimental.do_not_convert  # straight-line TF: nothing to convert
        def call_module(images):
            return module(images)

        return call_module, _traced_specs(module)
    signature = getattr(module, "signatures", {}).get("serving_default")
    inputs = signature.structured_input_signature[1] if signature is not None else {}
    if len(inputs) != 1:
        raise RetrainError(f"{spec}: module is not callable and has no one-input serving_default "
                           f"signature; expected {CONVENTION}")
    (input_name,) = inputs

    @tf.autograph.experimental.do_not_convert
    def call(images):
        outputs = signature(**{input_name: images})
        if isinstance(outputs, dict) and len(outputs) == 1:
            return next(iter(outputs.values()))
        return outputs

    return call, list(inputs.values())


def _traced_specs(module):
    """First-argument TensorSpecs of a restored tf.function (`module.__call__`); may be empty."""
    function = getattr(module, "__call__", None)
    specs = []
    for concrete in getattr(function, "concrete_functions", None) or []:
        args = concrete.structured_input_signature[0]
        if args and isinstance(args[0], tf.TensorSpec):
            specs.append(args[0])
    return specs


def _resolve_image_size(spec, input_specs, image_size, preset_size=None):
    """The module's fixed H, W if its signature has them, else image_size, the preset's or 224x224."""
    for s in input_specs:
        if s.shape.rank != 4 or s.dtype != tf.float32 or s.shape[3] not in (3, None):
            raise RetrainError(f"{spec}: module input is {s.dtype.name} {s.shape}; "
                               f"expected {CONVENTION}")
    fixed = {tuple(s.shape[1:3]) for s in input_specs if None not in tuple(s.shape[1:3])}
    if len(fixed) == 1:
        size = fixed.pop()
        if image_size is not None and tuple(image_size) != size:
            raise RetrainError(f"{spec}: module takes {size[0]}x{size[1]} images, not "
                               f"{image_size[0]}x{image_size[1]}; leave backbone.image_size "
                               f"unset or set it to {size[0] if size[0] == size[1] else list(size)}")
        return size
    return tuple(image_size or preset_size or DEFAULT_IMAGE_SIZE)


def _validate(spec, call, size):
    """Run the module on two black images; return D or raise naming the convention."""
    try:
        out = call(tf.zeros([2, *size, 3], tf.float32))
    except Exception as e:
        raise RetrainError(f"{spec}: module fails on float32 [2,{size[0]},{size[1]},3] input "
                           f"({type(e).__name__}: {_first_line(e)}); expected {CONVENTION}"
                           ) from None
    if not isinstance(out, tf.Tensor):
        raise RetrainError(f"{spec}: module returns {type(out).__name__}, not one Tensor; "
                           f"expected {CONVENTION}")
    if out.dtype != tf.float32 or out.shape.rank != 2 or out.shape[0] != 2:
        raise RetrainError(f"{spec}: module returns {out.dtype.name} {out.shape.as_list()} for "
                           f"2 images; expected {CONVENTION}")
    return out.shape[1]


def _module_variables(module):
    variables = getattr(module, "variables", None)
    if variables:
        return list(variables)
    seen, found = set(), []
    for obj in tf.train.TrackableView(module).descendants():
        if isinstance(obj, tf.Variable) and id(obj) not in seen:
            seen.add(id(obj))
            found.append(obj)
    return found


def _backbone_id(spec, module, image_size, source, extra=""):
    """sha256 over the sorted per-variable digests (dtype, shape, bytes), version and size.

    Sorting the digests makes the id independent of variable names and traversal order, so it
    depends on the weights' content alone: the same on every machine and every conversion.
    A module without variables (weights baked in as constants) is identified by its graph file.
    """
    digests = []
    for v in _module_variables(module):
        value = np.ascontiguousarray(v.numpy())
        h = hashlib.sha256(f"{value.dtype.str}{value.shape}".encode())
        h.update(value.tobytes())
        digests.append(h.hexdigest())
    if not digests:
        digests.append(_graph_digest(spec, source))
    total = hashlib.sha256()
    for d in sorted(digests):
        total.update(d.encode())
    total.update(f"|backbone-v{BACKBONE_VERSION}|{image_size[0]}x{image_size[1]}|{extra}".encode())
    return total.hexdigest()


def _graph_digest(spec, source):
    folder = source if os.path.isdir(source) else presets.hub_cache_path(source)
    try:
        with open(os.path.join(folder or "", "saved_model.pb"), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        raise RetrainError(f"{spec}: module has neither variables nor a saved_model.pb to "
                           "identify it by") from None


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else "no details"
