"""TensorFlow only where a model is trained or exported, and one definition of the head.

The layout shows the boundary: `retrain/tf/` holds every module that imports TensorFlow, Keras or
TF Hub, and no other module or light stage does (tests/test_pipeline.py checks the real runs:
`sys.modules` after each light stage, `retrain predict` and the served model). The head is
defined once (`retrain.head.architecture` + `logits`): a head with another hidden activation is
trained, evaluated (numpy), run by Keras and exported (SavedModel and .tflite) with the same numbers.
"""

import ast
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "keras", "tensorflow_hub", "tf_keras")
TF_STAGES = {"train", "finetune", "export"}  # they reach TensorFlow only through retrain.tf


def _imported_modules(file: Path, depth: int = 1) -> set[str]:
    """Modules file imports anywhere (in functions too), cut to their first `depth` dotted parts."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {".".join(alias.name.split(".")[:depth]) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(".".join(node.module.split(".")[:depth]))
    return names


def test_only_retrain_tf_imports_tensorflow():
    outside = [
        f for f in sorted((REPO / "retrain").rglob("*.py")) if "tf" not in f.relative_to(REPO / "retrain").parts[:1]
    ]
    outside += sorted((REPO / "stages").glob("*.py"))
    offenders = {str(f.relative_to(REPO)): sorted(_imported_modules(f) & set(HEAVY)) for f in outside}
    assert not {f: m for f, m in offenders.items() if m}, "TensorFlow imported outside retrain/tf/"
    inside = [f for f in (REPO / "retrain" / "tf").glob("*.py") if f.name != "__init__.py"]
    light = [
        f.name for f in inside if not (_imported_modules(f) & set(HEAVY) or "retrain.tf" in _imported_modules(f, 2))
    ]
    assert not light, f"modules in retrain/tf/ that need no TensorFlow, to move out: {light}"


def test_light_stages_do_not_reach_retrain_tf_at_import_time():
    """A stage script may call into retrain.tf only from inside a function (when the work needs it)."""
    for script in sorted((REPO / "stages").glob("*.py")):
        top_level = [
            node for node in ast.parse(script.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))
        ]
        modules = {n.module for n in top_level if isinstance(n, ast.ImportFrom)} | {
            a.name for n in top_level if isinstance(n, ast.Import) for a in n.names
        }
        uses_tf = any(m and m.startswith("retrain.tf") for m in modules)
        assert uses_tf == (script.stem in {"train", "export"}), script.name


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_every_path_runs_the_same_head(activation, tiny_backbone, tmp_path):
    import tensorflow as tf

    from default_params import default_params
    from retrain.backbones import load_backbone
    from retrain.head import load_head, save_head
    from retrain.tf.export import build_classifier
    from retrain.tf.head_training import keras_head, to_head, train_head
    from retrain.tflite_variants import TfliteModel

    rng = np.random.default_rng(0)
    backbone = load_backbone(str(tiny_backbone))
    images = rng.random((12, *backbone.image_size, 3), dtype=np.float32)
    x = backbone.features(tf.constant(images)).numpy()
    y = np.arange(12) % 3
    params = default_params(**{"train.hidden_units": 8, "train.activation": activation, "train.epochs": 3}).train
    model, _ = train_head((x, y), (x, y), 3, params, seed=0)
    save_head(to_head(model), tmp_path / "head.npz")
    head = load_head(tmp_path / "head.npz")  # what evaluate runs, in numpy
    assert head.activations == [activation, "softmax"]
    evaluated = head.probabilities(x)
    assert np.abs(model(x, training=False).numpy() - evaluated).max() < 1e-5  # Keras' own layers agree
    assert np.abs(keras_head(head)(x, training=False).numpy() - evaluated).max() < 1e-5  # fine-tuning's start
    classifier = build_classifier(backbone, head, ["a", "b", "c"], top_k=2)
    exported = classifier.classify_images(tf.constant(images))["probabilities"].numpy()
    assert np.abs(exported - evaluated).max() < 1e-5
    from retrain.tf.tflite_convert import convert
    from retrain.tflite_metadata import write_metadata

    phone = TfliteModel(write_metadata(convert(classifier, "float32"), ["a", "b", "c"]), "model.tflite")
    assert np.abs(phone.probabilities_of_image(images[0]) - evaluated[0]).max() < 1e-4
