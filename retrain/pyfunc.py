"""What `mlflow.pyfunc.log_model` / `save_model` get for an exported model: one definition, used by
the export stage and the tests, so the model MLflow serves is the model that was checked."""

import importlib.metadata
import json
from pathlib import Path

import retrain
from retrain.tflite_metadata import PIXEL_MEAN, PIXEL_STD


def pyfunc_model(model_dir: Path, labels: list[str], top_k: int) -> dict:
    """Keyword arguments for mlflow.pyfunc.log_model/save_model of model_dir/model.tflite.

    Writes model_dir/classes.json (labels, top-k, input normalisation) beside it. The served model
    is `retrain/mlflow_model.py`, with the `retrain` package as its code (the one decoder): it needs
    LiteRT, Pillow, numpy and MLflow, and no TensorFlow."""
    import mlflow

    model_dir = Path(model_dir)
    classes = model_dir / "classes.json"
    classes.write_text(
        json.dumps(
            {"labels": labels, "top_k": min(top_k, len(labels)), "mean": PIXEL_MEAN, "std": PIXEL_STD},
            ensure_ascii=False,
        )
        + "\n",
        encoding="utf-8",
    )
    package = Path(retrain.__file__).parent
    versions = {name: importlib.metadata.version(name) for name in ("ai-edge-litert", "numpy", "pillow", "pandas")}
    return {
        "python_model": str(package / "mlflow_model.py"),
        "artifacts": {"tflite": str(model_dir / "model.tflite"), "classes": str(classes)},
        "code_paths": [str(package)],
        "pip_requirements": [f"mlflow=={mlflow.__version__}", *(f"{n}=={v}" for n, v in versions.items())],
    }
