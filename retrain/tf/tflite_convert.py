"""Converting the classifier to TFLite: float32, float16, dynamic-range and full-integer int8.

What each variant is and how it is judged: `retrain.tflite_variants` (no TensorFlow there).
"""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tensorflow as tf

from retrain.atomic import atomic_file
from retrain.tflite_metadata import write_metadata
from retrain.tflite_variants import (BASELINE, EVALUATION_THREADS, METRICS_FILE, VARIANTS, VariantResult, apply_drop_gate,
                                     evaluate_variants, file_name, flat_metrics, representative_images)


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


def export_variants(classifier, out_dir: Path, export, seed: int, train_paths: list[str], test_paths: list[str],
                    test_labels: np.ndarray) -> dict[str, float]:
    """Convert, evaluate and gate the `export.tflite_quantized` variants beside out_dir/model.tflite
    (float32, written by save_classifier); write the accepted ones and out_dir/tflite_metrics.json.
    `export` is params' ExportParams. Returns flat metrics for MLflow: tflite_<variant>_accuracy,
    _size_bytes, _latency_ms and _written (1 or 0)."""
    out_dir = Path(out_dir)
    labels = [label.decode() for label in classifier.label_table.numpy()]
    variants, max_drop = export.tflite_quantized, export.max_quantization_drop
    calibration = (representative_images(train_paths, export.representative_images, seed, classifier.image_size)
                   if "int8" in variants else None)
    models = {BASELINE: (out_dir / file_name(BASELINE)).read_bytes()}
    models.update({v: write_metadata(convert(classifier, v, calibration), labels) for v in variants if v != BASELINE})
    results = evaluate_variants(models, test_paths, test_labels)
    apply_drop_gate(results, max_drop)
    for variant, result in results.items():
        if variant != BASELINE and result.written:
            with atomic_file(out_dir / result.file) as temp:
                temp.write_bytes(models[variant])
        print(result.refused or f"{variant}: test accuracy {result.accuracy:.4f}, {result.size_bytes / 1e6:.2f} MB, "
              f"{result.latency_ms:.3g} ms per image; {result.file}")
    _write_report(out_dir / METRICS_FILE, results, len(test_paths), max_drop, calibration, seed)
    return flat_metrics(results)


def _write_report(path: Path, results: dict[str, "VariantResult"], test_images: int, max_drop: float,
                  calibration: np.ndarray | None, seed: int) -> None:
    report = {"test_images": test_images, "threads": EVALUATION_THREADS, "max_quantization_drop": max_drop,
              "representative_images": 0 if calibration is None else len(calibration), "seed": seed,
              "variants": {v: asdict(r) for v, r in results.items()}}
    with atomic_file(path) as temp:
        temp.write_text(json.dumps(report, indent=2) + "\n")


