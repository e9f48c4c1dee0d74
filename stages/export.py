"""export: one SavedModel (image bytes in, labels out), labels.txt and TFLite; logged to MLflow.

The model is the one data/finetune/ holds (fine-tuned or the frozen head). Experiments log it but
do not register it: `retrain promote` does that, deliberately.
"""

import json

import numpy as np

from retrain import paths
from retrain.backbones import load_backbone
from retrain.errors import RetrainError, exit_on_error
from retrain.features import load_labels
from retrain.head import load_head
from retrain.model_input import backbone_spec
from retrain.params import load_params
from retrain.pyfunc import write_classes
from retrain.records import stage_record
from retrain.tf.export import build_classifier, check_accuracy, check_reproduces, save_classifier
from retrain.tf.tflite_convert import export_variants
from retrain.tflite_variants import train_image_paths

SAVED_MODEL_CHECK_IMAGES = 32  # a batch through the SavedModel's graph; all of them take seconds more


def export():
    params = load_params()
    if not paths.METRICS.exists():
        raise RetrainError(f"{paths.METRICS}: not found; run the evaluate stage first (dvc repro evaluate)")
    metrics = json.loads(paths.METRICS.read_text())
    check_accuracy(metrics["accuracy"], params.evaluate.min_accuracy)
    name, size = backbone_spec(paths.FINETUNE_DIR)
    backbone = load_backbone(name, image_size=size)
    labels = load_labels(paths.FINETUNE_DIR)
    classifier = build_classifier(backbone, load_head(paths.FINETUNE_HEAD), labels, params.export.top_k)
    saved_model = save_classifier(classifier, paths.MODEL_DIR, tflite=True)  # model.tflite: what predict runs
    with np.load(paths.PREDICTIONS, allow_pickle=False) as predictions:
        expected, test_paths = predictions["probabilities"], [str(p) for p in predictions["paths"]]
        test_labels = predictions["labels"]
    # The SavedModel's own decoder on a sample (its graph is what TF Serving runs); model.tflite,
    # which `retrain predict` and the MLflow model run, on every test image in export_variants.
    sample = np.unique(np.linspace(0, len(test_paths) - 1, SAVED_MODEL_CHECK_IMAGES).astype(int))  # every class
    worst = check_reproduces(saved_model, [test_paths[i] for i in sample], expected[sample])
    write_classes(paths.MODEL_DIR, labels, params.export.top_k)  # the served MLflow model's labels
    tflite_metrics = export_variants(
        classifier,
        paths.MODEL_DIR,
        params.export,
        params.seed,
        train_image_paths(paths.SPLIT_CSV),
        test_paths,
        test_labels,
        expected,
    )
    with stage_record("export") as record:
        record.set_tags({"export.max_abs_difference": f"{worst:.3g}", "export.saved_model_checked": len(sample)})
        record.log_artifacts(paths.MODEL_DIR / "labels.txt")
        # Charts grouped under tflite/: <variant>_accuracy, _size_bytes, _latency_ms; whether written is a tag.
        record.log_metrics(
            {k.replace("tflite_", "tflite/", 1): v for k, v in tflite_metrics.items() if not k.endswith("_written")}
        )
        record.set_tags(
            {k.replace("tflite_", "tflite.", 1): bool(v) for k, v in tflite_metrics.items() if k.endswith("_written")}
        )
        record.model = {"example": test_paths[0]}  # the log stage logs model/ as the run's MLflow model
    print(
        f"exported to {paths.MODEL_DIR}/: model.tflite reproduces evaluate within "
        f"{tflite_metrics['tflite_float32_max_abs_difference']:.1e} on {len(test_paths)} test images, "
        f"the SavedModel within {worst:.1e} on {len(sample)}"
    )


if __name__ == "__main__":
    exit_on_error(export)
