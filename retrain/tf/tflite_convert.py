"""Converting the classifier to TFLite: float32, float16, dynamic-range and full-integer int8.

What each variant is and how it is judged: `retrain.tflite_variants` (no TensorFlow there).
"""

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tensorflow as tf

from retrain.atomic import atomic_file
from retrain.cache import backbones_root
from retrain.head import Head
from retrain.tflite_metadata import write_metadata
from retrain.tflite_variants import (
    BASELINE,
    EVALUATION_THREADS,
    METRICS_FILE,
    VARIANTS,
    VariantResult,
    apply_drop_gate,
    evaluate_variants,
    file_name,
    flat_metrics,
    representative_images,
)


def convert(classifier, variant: str, representative: np.ndarray | None = None) -> bytes:
    """The classifier as a .tflite of `variant` (no metadata); int8 needs representative float32
    images [N,H,W,3] in [0, 1]."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions([_single_image(classifier, variant)], classifier)
    if variant != BASELINE:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # alone: dynamic-range int8 weights
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "int8":
        if representative is None or not len(representative):
            raise ValueError("int8 needs representative images")
        converter.representative_dataset = lambda: _calibration(representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    elif variant not in VARIANTS:
        raise ValueError(f"unknown TFLite variant {variant!r}")
    return converter.convert()


# Bump when float32_model's templates or patching change.
TEMPLATE_VERSION = "1"


def float32_model(classifier, reference=None) -> bytes:
    """`convert(classifier, "float32")`, without converting the backbone again for every head.

    Converting costs ~5 s, nearly all of it the backbone, which experiments on the head never
    change. So the classifier is converted once per (backbone, head shapes and activations) with
    a marker head of seeded random weights, kept as a template in `backbones_root()`, and each
    export writes its own head's weights over the marker's bytes (found by value: each marker
    array occurs once). The result is checked against TensorFlow on an image (`reference`: a
    function of float32 images [N,H,W,3] to probabilities, e.g. the saved model's; default the
    classifier's own graph); anything unexpected falls back to a full conversion.
    """
    head, backbone = classifier._head, classifier._source
    key = hashlib.sha256(
        json.dumps(
            [
                TEMPLATE_VERSION,
                tf.__version__,
                backbone.weights_id,
                list(classifier.image_size),
                [list(k.shape) for k in head.kernels],
                head.activations,
            ]
        ).encode()
    ).hexdigest()
    path = backbones_root() / "classifiers" / f"{key[:32]}.tflite"
    marker = _marker_head(head, int(key[:8], 16))
    try:
        template = path.read_bytes()
    except OSError:
        from retrain.tf.export import build_classifier

        template = convert(build_classifier(backbone, marker, ["marker"] * head.num_classes, 1), BASELINE)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as temp:
            temp.write_bytes(template)
    model = _with_head(template, marker, head)
    if model is None or not _agrees(model, classifier, reference):
        return convert(classifier, BASELINE)
    return model


def _marker_head(head: Head, seed: int) -> Head:
    rng = np.random.default_rng(seed)
    return Head(
        [rng.standard_normal(k.shape).astype(np.float32) * 0.05 for k in head.kernels],
        [rng.standard_normal(b.shape).astype(np.float32) * 0.05 for b in head.biases],
        list(head.activations),
    )


def _with_head(template: bytes, marker: Head, head: Head) -> bytes | None:
    """template with every marker array's bytes replaced by head's (kernels may be stored
    transposed, as FULLY_CONNECTED keeps them); None when a marker is not found exactly once."""
    model = bytearray(template)
    pairs = [(m, h) for m, h in zip(marker.kernels, head.kernels)] + [
        (m, h) for m, h in zip(marker.biases, head.biases)
    ]
    for old, new in pairs:
        for layout in (lambda a: a, lambda a: a.T):
            found = model.find(np.ascontiguousarray(layout(old)).tobytes())
            if found >= 0:
                break
        if found < 0 or model.find(np.ascontiguousarray(layout(old)).tobytes(), found + 1) >= 0:
            return None
        replacement = np.ascontiguousarray(layout(new), dtype="<f4").tobytes()
        model[found : found + len(replacement)] = replacement
    return bytes(model)


def _agrees(model: bytes, classifier, reference=None, tolerance: float = 1e-4) -> bool:
    """The patched model gives TensorFlow's probabilities (`reference`'s) on a seeded random image."""
    from retrain.backbones.xnnpack import interpreter

    image = np.random.default_rng(0).random((1, *classifier.image_size, 3), dtype=np.float32)
    runner = interpreter(model_content=model, num_threads=1)
    runner.set_tensor(runner.get_input_details()[0]["index"], image)
    runner.invoke()
    ours = runner.get_tensor(runner.get_output_details()[0]["index"])
    if reference is None:
        reference = lambda images: classifier._classify_images(images, single_pass=True)["probabilities"]  # noqa: E731
    theirs = np.asarray(reference(tf.constant(image)))
    return ours.shape == theirs.shape and float(np.max(np.abs(ours - theirs))) <= tolerance


def _single_image(classifier, variant: str):
    height, width = classifier.image_size
    spec = tf.TensorSpec([1, height, width, 3], tf.float32, name="images")
    classify = tf.function(lambda images: classifier._classify_images(images, single_pass=True), input_signature=[spec])
    return classify.get_concrete_function()


def _calibration(representative: np.ndarray):
    """int8's calibration batches: each image with one black and one white pixel.

    A phone feeds a uint8 model its pixels as they are, so the input's quantization must span
    exactly [0, 1] in 256 steps (scale 1/255, zero point 0); calibration gives the input the range
    its sample spans (0.90 of it on solid-colour test images). Two pixels per image make that the
    whole range and barely move any other tensor's. (A FakeQuant op on the input pinned it too but
    cost 8.6 points of test accuracy on the flowers: 0.844 against 0.939 without it.)
    """
    for image in representative:
        image = image.copy()
        image[0, 0], image[-1, -1] = 0.0, 1.0
        yield [image[None]]


def export_variants(
    classifier,
    out_dir: Path,
    export,
    seed: int,
    train_paths: list[str],
    test_paths: list[str],
    test_labels: np.ndarray,
    expected: np.ndarray | None = None,
) -> dict[str, float]:
    """Convert, evaluate and gate the `export.tflite_quantized` variants beside out_dir/model.tflite
    (float32, written by save_classifier); write the accepted ones and out_dir/tflite_metrics.json.
    `export` is params' ExportParams; `expected`, evaluate's test probabilities, which float32 must
    reproduce. Returns flat metrics for MLflow: tflite_<variant>_accuracy, _size_bytes, _latency_ms
    and _written (1 or 0), and tflite_float32_max_abs_difference with `expected`."""
    out_dir = Path(out_dir)
    labels = [label.decode() for label in classifier.label_table.numpy()]
    variants, max_drop = export.tflite_quantized, export.max_quantization_drop
    calibration = (
        representative_images(train_paths, export.representative_images, seed, classifier.image_size)
        if "int8" in variants
        else None
    )
    models = {BASELINE: (out_dir / file_name(BASELINE)).read_bytes()}
    models.update({v: write_metadata(convert(classifier, v, calibration), labels) for v in variants if v != BASELINE})
    results = evaluate_variants(models, test_paths, test_labels, expected)
    apply_drop_gate(results, max_drop)
    for variant, result in results.items():
        if variant != BASELINE and result.written:
            with atomic_file(out_dir / result.file) as temp:
                temp.write_bytes(models[variant])
        print(
            result.refused
            or f"{variant}: test accuracy {result.accuracy:.4f}, {result.size_bytes / 1e6:.2f} MB, "
            f"{result.latency_ms:.3g} ms per image; {result.file}"
        )
    _write_report(out_dir / METRICS_FILE, results, len(test_paths), max_drop, calibration, seed)
    flat = flat_metrics(results)
    if results[BASELINE].max_abs_difference is not None:
        flat[f"tflite_{BASELINE}_max_abs_difference"] = results[BASELINE].max_abs_difference
    return flat


def _write_report(
    path: Path,
    results: dict[str, "VariantResult"],
    test_images: int,
    max_drop: float,
    calibration: np.ndarray | None,
    seed: int,
) -> None:
    report = {
        "test_images": test_images,
        "threads": EVALUATION_THREADS,
        "max_quantization_drop": max_drop,
        "representative_images": 0 if calibration is None else len(calibration),
        "seed": seed,
        "variants": {v: asdict(r) for v, r in results.items()},
    }
    with atomic_file(path) as temp:
        temp.write_text(json.dumps(report, indent=2) + "\n")
