"""TFLite metadata: labels, input normalisation and input type inside each .tflite file.

Written with MediaPipe's metadata writers (`mediapipe.tasks.python.metadata.metadata_writers`,
what MediaPipe Model Maker uses), so MediaPipe's `ImageClassifier` on a phone or in Python loads
our files as they are and names classes with `category_name`. Read back with MediaPipe's
metadata (`read_metadata`, without importing mediapipe's package, which imports TensorFlow), so
`retrain predict` on a .tflite takes its labels and normalisation from the file, as any client
would. mediapipe's writers are imported only here and only when called: they are large.
"""

import functools
import importlib.util
import io
import sys
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path

from retrain.errors import RetrainError

# Pixels as a phone gives them, 0..255, become the model's [0, 1] by (pixel - MEAN) / STD.
PIXEL_MEAN = 0.0
PIXEL_STD = 255.0

_VERSION_MODULE = "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version"
# The fields MediaPipe's image classifier writer fills (ImageProperties, NormalizationOptions,
# TENSOR_AXIS_LABELS files without a version) all date from metadata schema 1.0.0.
_IMAGE_CLASSIFIER_PARSER_VERSION = "1.0.0"


@dataclass(frozen=True)
class TfliteMetadata:
    labels: list[str]
    mean: tuple[float, ...]  # float inputs: model input = (pixel - mean) / std, one value or one per channel
    std: tuple[float, ...]


def _import_mediapipe() -> None:
    """Import mediapipe's metadata modules, mending two faults of its wheels first and last."""
    _provide_parser_version()
    from mediapipe.tasks.python.audio.core import audio_record
    from mediapipe.tasks.python.metadata import metadata  # noqa: F401

    # Without PortAudio (no sound here) mediapipe keeps sounddevice's OSError, and with it the
    # importing stack's frames: the first caller's locals (a whole classifier) would never be freed.
    if getattr(audio_record, "sd_error", None) is not None:
        audio_record.sd_error = audio_record.sd_error.with_traceback(None)


def _provide_parser_version() -> None:
    """mediapipe 0.10.30+ wheels (1.2.3 included) lack the compiled `_pywrap_metadata_version` that
    its metadata.py imports for one call, the minimum parser version; everything else is pure Python
    or in libmediapipe.so. Stand in for it with the version our writer's fields need, unless a
    wheel that ships the real module is installed."""
    tasks = importlib.util.find_spec("mediapipe.tasks") if importlib.util.find_spec("mediapipe") else None
    if tasks is None:
        raise RetrainError("TFLite metadata needs mediapipe, which is not installed: pip install mediapipe==1.2.3")
    if _VERSION_MODULE in sys.modules or any((Path(p) / "cc").is_dir() for p in tasks.submodule_search_locations):
        return
    parts = _VERSION_MODULE.split(".")
    for depth in range(3, len(parts)):
        sys.modules.setdefault(".".join(parts[:depth]), types.ModuleType(".".join(parts[:depth])))
    stand_in = types.ModuleType(_VERSION_MODULE)
    stand_in.GetMinimumMetadataParserVersion = lambda _metadata: _IMAGE_CLASSIFIER_PARSER_VERSION
    sys.modules[_VERSION_MODULE] = stand_in


def write_metadata(model: bytes, labels: list[str]) -> bytes:
    """The .tflite `model` with image classifier metadata: labels.txt embedded, input normalisation
    (mean 0, std 255: pixels to [0, 1]); the input type (float32 or uint8) is the model's own."""
    _import_mediapipe()
    from mediapipe.tasks.python.metadata.metadata_writers import image_classifier, metadata_writer

    writer = image_classifier.MetadataWriter.create(
        bytearray(model), [PIXEL_MEAN], [PIXEL_STD], metadata_writer.Labels().add(labels)
    )
    with_metadata, _ = writer.populate()
    return bytes(with_metadata)


def read_metadata(model: bytes, source: str) -> TfliteMetadata:
    """Labels and normalisation from a .tflite file's metadata; one line naming `source` when absent.

    Read without importing mediapipe (whose package imports TensorFlow when installed, 4-5 s): the
    labels file is a zip member appended to the model, as the metadata populator packs it, and the
    normalisation comes from the metadata flatbuffer, parsed with the generated schema modules of
    ai-edge-litert (the model) and mediapipe (the metadata) loaded on their own.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(model)) as packed:
            labels = packed.read("labels.txt").decode("utf-8").split("\n")
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError):
        raise RetrainError(
            f"{source}: no TFLite metadata (labels) in this file; export it with `dvc repro export`"
        ) from None
    labels = labels[:-1] if labels and labels[-1] == "" else labels
    mean, std = _normalisation(model)
    return TfliteMetadata(labels, mean, std)


def _normalisation(model: bytes) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the input's NormalizationOptions; this project's (0, 255) when there are none."""
    from ai_edge_litert import schema_py_generated as model_schema

    schema = _metadata_schema()
    root = model_schema.Model.GetRootAs(model, 0)
    for i in range(root.MetadataLength()):
        if root.Metadata(i).Name() == b"TFLITE_METADATA":
            buffer = root.Buffers(root.Metadata(i).Buffer())
            data = (
                model[buffer.Offset() : buffer.Offset() + buffer.Size()]
                if buffer.Offset() > 1
                else buffer.DataAsNumpy().tobytes()
            )
            metadata = schema.ModelMetadataT.InitFromObj(schema.ModelMetadata.GetRootAs(data, 0))
            (tensor, *_) = metadata.subgraphMetadata[0].inputTensorMetadata
            for unit in tensor.processUnits or []:
                if unit.optionsType == schema.ProcessUnitOptions.NormalizationOptions:
                    return tuple(map(float, unit.options.mean)), tuple(map(float, unit.options.std))
    return (PIXEL_MEAN,), (PIXEL_STD,)


@functools.cache
def _metadata_schema():
    """mediapipe's generated metadata schema module (pure flatbuffers code), loaded from its file
    without running the mediapipe package's __init__."""
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        raise RetrainError(
            "reading TFLite metadata needs mediapipe, which is not installed: pip install mediapipe==1.2.3"
        )
    path = Path(spec.submodule_search_locations[0]) / "tasks" / "metadata" / "metadata_schema_py_generated.py"
    loader = importlib.util.spec_from_file_location("retrain_tflite_metadata_schema", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module
