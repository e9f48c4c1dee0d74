"""export: one SavedModel (image bytes in, labels out), labels.txt and TFLite; logged to MLflow."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

import retrain
from retrain import paths, tracking
from retrain.backbones import load_backbone
from retrain.errors import RetrainError, exit_on_error
from retrain.export import build_classifier, check_accuracy, check_reproduces, load_model, save_classifier
from retrain.features import load_labels
from retrain.finetune import evaluation_inputs, finetuned
from retrain.head import dense_layers, load_head
from retrain.params import load_params


def export():
    params = load_params()
    if not paths.METRICS.exists():
        raise RetrainError(f"{paths.METRICS}: not found; run the evaluate stage first (dvc repro evaluate)")
    metrics = json.loads(paths.METRICS.read_text())
    check_accuracy(metrics["accuracy"], params.evaluate.min_accuracy)
    size = params.backbone.image_size
    name = str(paths.FINETUNE_BACKBONE) if finetuned() else params.backbone.name
    backbone = load_backbone(name, image_size=(size, size) if size else None)
    labels = load_labels(paths.FEATURES_DIR)
    _, head = evaluation_inputs()
    classifier = build_classifier(backbone, dense_layers(load_head(head)), labels, params.export.top_k)
    save_classifier(classifier, paths.MODEL_DIR, params.export.tflite)
    with np.load(paths.PREDICTIONS, allow_pickle=False) as predictions:
        expected, test_paths = predictions["probabilities"], [str(p) for p in predictions["paths"]]
    worst = check_reproduces(load_model(paths.MODEL_DIR), test_paths, expected)
    with tracking.resumed_run(paths.RUN_FILE):
        mlflow.log_metric("export_max_abs_difference", worst)
        mlflow.log_artifact(str(paths.MODEL_DIR / "labels.txt"))
        _log_model(test_paths[0], params.export.registered_model_name)
    print(f"exported to {paths.MODEL_DIR}/ (reproduces evaluate within {worst:.1e})")


def _log_model(example_image: str, registered_name: str | None) -> None:
    example = pd.DataFrame({"image": [Path(example_image).read_bytes()]})
    mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(retrain.__file__).parent / "mlflow_model.py"),
        artifacts={"saved_model": str(paths.MODEL_DIR / "saved_model")},
        input_example=example,
        registered_model_name=registered_name,
        pip_requirements=["tensorflow-cpu==2.21.0", f"mlflow=={mlflow.__version__}", "pandas"],
    )


if __name__ == "__main__":
    exit_on_error(export)
