"""export: one SavedModel (image bytes in, labels out), labels.txt and TFLite; logged to MLflow.

The model is the one data/finetune/ holds (fine-tuned or the frozen head). Experiments log it but
do not register it: `retrain promote` does that, deliberately.
"""

import json
from pathlib import Path

import numpy as np

from retrain import paths, tracking
from retrain.backbones import load_backbone
from retrain.errors import RetrainError, exit_on_error
from retrain.features import load_labels
from retrain.head import load_head
from retrain.model_input import backbone_spec
from retrain.params import load_params
from retrain.pyfunc import pyfunc_model
from retrain.tf.export import build_classifier, check_accuracy, check_reproduces, load_model, save_classifier
from retrain.tf.tflite_convert import export_variants
from retrain.tflite_variants import train_image_paths


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
    save_classifier(classifier, paths.MODEL_DIR, tflite=True)  # retrain predict and the MLflow model run it
    with np.load(paths.PREDICTIONS, allow_pickle=False) as predictions:
        expected, test_paths = predictions["probabilities"], [str(p) for p in predictions["paths"]]
        test_labels = predictions["labels"]
    worst = check_reproduces(load_model(paths.MODEL_DIR), test_paths, expected)
    tflite_metrics = export_variants(
        classifier,
        paths.MODEL_DIR,
        params.export,
        params.seed,
        train_image_paths(paths.SPLIT_CSV),
        test_paths,
        test_labels,
    )
    with tracking.stage_run("export", params) as run:
        import mlflow

        run.set_tags({"export.max_abs_difference": f"{worst:.3g}"})
        mlflow.log_artifact(str(paths.MODEL_DIR / "labels.txt"))
        # Charts grouped under tflite/: <variant>_accuracy, _size_bytes, _latency_ms; whether written is a tag.
        run.log_metrics(
            {k.replace("tflite_", "tflite/", 1): v for k, v in tflite_metrics.items() if not k.endswith("_written")}
        )
        run.set_tags(
            {k.replace("tflite_", "tflite.", 1): bool(v) for k, v in tflite_metrics.items() if k.endswith("_written")}
        )
        model_uri = _log_model(test_paths[0], labels, params.export.top_k)
        run.set_tags({"retrain.model_uri": model_uri})  # in the provenance too: promote reads it
    print(
        f"exported to {paths.MODEL_DIR}/ (reproduces evaluate within {worst:.1e}); MLflow model {model_uri}; "
        f"register it with `retrain promote {run.run_name} --alias champion`"
    )


def _log_model(example_image: str, labels: list[str], top_k: int) -> str:
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    example = pd.DataFrame({"image": [Path(example_image).read_bytes()]})
    # Given, not inferred: inferring it from the example loads and runs the model once more.
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(
            [
                ColSpec("string", "label"),
                ColSpec("double", "probability"),
                ColSpec(Array("string"), "top_k_labels"),
                ColSpec(Array("double"), "top_k_probabilities"),
            ]
        ),
    )
    info = mlflow.pyfunc.log_model(
        name="model", input_example=example, signature=signature, **pyfunc_model(paths.MODEL_DIR, labels, top_k)
    )
    return info.model_uri


if __name__ == "__main__":
    exit_on_error(export)
