"""Restoring and checking backbone modules in TensorFlow (`retrain.backbones.loader` decides when).

Modules are loaded with `tf.saved_model.load` / `tensorflow_hub.load`, never `hub.KerasLayer`
(it fails under Keras 3), run on two black images to check TF Hub's image feature-vector
convention, and identified by a digest of their weights.
"""

import hashlib
import os

import numpy as np
import tensorflow as tf

from retrain.backbones import presets
from retrain.backbones.loader import BACKBONE_VERSION, CONVENTION, DEFAULT_IMAGE_SIZE, _first_line
from retrain.errors import RetrainError


def check_module(spec, load, image_size, source, extra):
    """(module, feature function, (H, W), D, id) of the module `load()` restores, checked."""
    module = load()
    call, input_specs = feature_function(spec, module)
    size = _resolve_image_size(spec, input_specs, image_size, presets.image_size(spec))
    feature_dim = _validate(spec, call, size)
    return module, call, size, feature_dim, _backbone_id(spec, module, size, source, extra)


def load_dir(spec, path):
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise RetrainError(
            f"{path}: not a SavedModel folder (no saved_model.pb); "
            "backbone.name takes a preset, a TF Hub URL or a SavedModel folder"
        )
    try:
        return tf.saved_model.load(path)
    except Exception as e:  # TF raises many types for a corrupt model
        raise RetrainError(f"{path}: cannot load SavedModel ({type(e).__name__}: {_first_line(e)})") from None


def load_hub(handle):
    cached = presets.hub_cache_path(handle)
    if not cached:
        presets.check_reachable(handle)
    import tensorflow_hub as hub  # only URL handles need it (it is slow to import)

    try:
        return hub.load(handle)
    except Exception as e:
        raise RetrainError(
            f"{handle}: cannot load TF Hub module ({type(e).__name__}: "
            f"{_first_line(e)}); to use a local copy set "
            "`backbone.name: /path/to/saved_model`"
        ) from None


def feature_function(spec, module):
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
        raise RetrainError(
            f"{spec}: module is not callable and has no one-input serving_default signature; expected {CONVENTION}"
        )
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
    function = module.__call__ if callable(module) else None
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
            raise RetrainError(f"{spec}: module input is {s.dtype.name} {s.shape}; expected {CONVENTION}")
    fixed = {tuple(s.shape[1:3]) for s in input_specs if None not in tuple(s.shape[1:3])}
    if len(fixed) == 1:
        size = fixed.pop()
        if image_size is not None and tuple(image_size) != size:
            raise RetrainError(
                f"{spec}: module takes {size[0]}x{size[1]} images, not "
                f"{image_size[0]}x{image_size[1]}; leave backbone.image_size "
                f"unset or set it to {size[0] if size[0] == size[1] else list(size)}"
            )
        return size
    return tuple(image_size or preset_size or DEFAULT_IMAGE_SIZE)


def _validate(spec, call, size):
    """Run the module on two black images; return D or raise naming the convention."""
    try:
        out = call(tf.zeros([2, *size, 3], tf.float32))
    except Exception as e:
        raise RetrainError(
            f"{spec}: module fails on float32 [2,{size[0]},{size[1]},3] input "
            f"({type(e).__name__}: {_first_line(e)}); expected {CONVENTION}"
        ) from None
    if not isinstance(out, tf.Tensor):
        raise RetrainError(f"{spec}: module returns {type(out).__name__}, not one Tensor; expected {CONVENTION}")
    if out.dtype != tf.float32 or out.shape.rank != 2 or out.shape[0] != 2:
        raise RetrainError(
            f"{spec}: module returns {out.dtype.name} {out.shape.as_list()} for 2 images; expected {CONVENTION}"
        )
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
        raise RetrainError(f"{spec}: module has neither variables nor a saved_model.pb to identify it by") from None


def to_tflite(backbone, batch: int) -> bytes:
    """The TFLite flatbuffer of single_pass for [batch, H, W, 3], TFLite built-in ops only."""
    spec = tf.TensorSpec([batch, *backbone.image_size, 3], tf.float32)
    graph = tf.function(backbone.single_pass_features, autograph=False).get_concrete_function(spec)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([graph], backbone.module)
    # Built-ins only: select TF ops would need the Flex delegate, which ai-edge-litert lacks.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter.convert()
