"""What `mlflow.pyfunc.log_model` / `save_model` get for an exported model: one definition, used by
the export stage and the tests, so the model MLflow serves is the model that was checked."""

import importlib.metadata
import json
from pathlib import Path

import retrain
from retrain.tflite_metadata import PIXEL_MEAN, PIXEL_STD


def write_classes(model_dir: Path, labels: list[str], top_k: int) -> None:
    """model_dir/classes.json (labels, top-k, input normalisation): what the served model reads.
    Written by export, beside model.tflite, so the log stage changes nothing in model/."""
    (Path(model_dir) / "classes.json").write_text(
        json.dumps(
            {"labels": labels, "top_k": min(top_k, len(labels)), "mean": PIXEL_MEAN, "std": PIXEL_STD},
            ensure_ascii=False,
        )
        + "\n",
        encoding="utf-8",
    )


def pyfunc_model(model_dir: Path) -> dict:
    """Keyword arguments for mlflow.pyfunc.log_model/save_model of model_dir/model.tflite and classes.json.

    The served model is `retrain/mlflow_model.py`, with the `retrain` package as its code (the one
    decoder): it needs LiteRT, Pillow, numpy and MLflow, and no TensorFlow."""
    model_dir = Path(model_dir)
    package = Path(retrain.__file__).parent
    versions = {
        name: importlib.metadata.version(name) for name in ("mlflow", "ai-edge-litert", "numpy", "pillow", "pandas")
    }
    return {
        "python_model": str(package / "mlflow_model.py"),
        "artifacts": {"tflite": str(model_dir / "model.tflite"), "classes": str(model_dir / "classes.json")},
        "code_paths": [str(package)],
        "pip_requirements": [f"{n}=={v}" for n, v in versions.items()],
    }
