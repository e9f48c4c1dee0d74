"""The model that goes on: what the finetune stage always writes and evaluate and export read.

data/finetune/ holds one complete model, fine-tuned or not: `head.npz`, `backbone.json` (what to
give `load_backbone`: the preset or handle and size, or the fine-tuned SavedModel beside it),
`labels.txt`, and the validation and test features that this model's backbone gives. With
fine-tuning off, the frozen head and the cached features are copied in as they are, so evaluate
and export never ask which stage produced their model. Imports no TensorFlow.
"""

import json
import shutil
from pathlib import Path

from retrain.errors import RetrainError


def write_frozen(out_dir: Path, features_dir: Path, head: Path, backbone: str, image_size: int | None) -> None:
    """Copy the train stage's head and the bottlenecks' validation/test features into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("validation.npz", "test.npz", "labels.txt"):
        shutil.copyfile(features_dir / name, out_dir / name)
    shutil.copyfile(head, out_dir / "head.npz")
    write_backbone_spec(out_dir, backbone, image_size)


def write_backbone_spec(out_dir: Path, backbone: str, image_size: int | None) -> None:
    (out_dir / "backbone.json").write_text(json.dumps({"name": backbone, "image_size": image_size}, indent=2) + "\n")


def backbone_spec(model_dir: Path) -> tuple[str, tuple[int, int] | None]:
    """(name for load_backbone, (height, width) or None) of the model in model_dir."""
    try:
        spec = json.loads((model_dir / "backbone.json").read_text())
    except FileNotFoundError:
        raise RetrainError(
            f"{model_dir / 'backbone.json'}: not found; run the finetune stage (dvc repro finetune)"
        ) from None
    size = spec.get("image_size")
    return spec["name"], (size, size) if size else None
