"""The exported SavedModel takes image bytes; `retrain predict` uses it like predict.py did."""

import json

import numpy as np
import pytest

from imagegen import image_bytes
from retrain.backbones import load_backbone
from retrain.cli import main
from retrain.errors import RetrainError
from retrain.export import build_classifier, check_accuracy, check_reproduces, load_model, save_classifier
from retrain.features import FeatureCache, compute_features
from retrain.head import dense_layers, train_head
from retrain.params import load_params

COLOURS = {"blue": (30, 40, 230), "green": (20, 200, 40), "red": (230, 20, 20)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_backbone):
    """A model trained on solid colour images, exported with TFLite."""
    from retrain.features import Example

    folder = tmp_path_factory.mktemp("train")
    backbone = load_backbone(str(tiny_backbone))
    examples = []
    for label, colour in COLOURS.items():
        for i in range(10):
            path = folder / f"{label}_{i}.png"
            path.write_bytes(image_bytes("PNG", colour, (48, 48), seed=i))
            examples.append(Example(str(path), label, "train", f"{label}{i:062d}"))
    cache = FeatureCache(folder / "cache", backbone.id, backbone.feature_dim)
    compute_features(examples, backbone, cache, batch_size=8)
    x = np.stack([cache.get(e.sha256) for e in examples])
    y = np.array([list(COLOURS).index(e.label) for e in examples])
    params = load_params().train.model_copy(update={"learning_rate": 0.05, "epochs": 60})
    head, _ = train_head((x, y), (x, y), 3, params, seed=0)
    out = tmp_path_factory.mktemp("export") / "model"
    save_classifier(build_classifier(backbone, dense_layers(head), list(COLOURS), top_k=2), out, tflite=True)
    expected = head.predict(x, verbose=0)
    return {"dir": out, "paths": [e.path for e in examples], "expected": expected, "images": folder}


def test_serving_signature_takes_any_image_format_and_returns_top_k_labels(exported):
    model = load_model(exported["dir"])
    contents = [image_bytes(fmt, COLOURS["red"], (50, 40), seed=3) for fmt in ("JPEG", "PNG", "BMP", "GIF", "WEBP")]
    out = model.signatures["serving_default"](image_bytes=np.array(contents, dtype=object))
    assert [row[0].decode() for row in out["top_k_labels"].numpy()] == ["red"] * 5
    assert out["probabilities"].shape == (5, 3) and out["top_k_probabilities"].shape == (5, 2)
    assert (exported["dir"] / "labels.txt").read_text().split() == list(COLOURS)


def test_export_reproduces_the_heads_predictions(exported):
    model = load_model(exported["dir"])
    assert check_reproduces(model, exported["paths"], exported["expected"]) < 1e-4
    with pytest.raises(RetrainError, match="differs"):
        check_reproduces(model, exported["paths"], exported["expected"][:, ::-1])


def test_tflite_model_agrees_with_the_saved_model(exported):
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(exported["dir"] / "model.tflite"))
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    images = np.random.default_rng(0).random((1, *inp["shape"][1:])).astype(np.float32)
    interpreter.set_tensor(inp["index"], images)
    interpreter.invoke()
    saved = load_model(exported["dir"]).signatures["classify_images"](images=tf.constant(images))["probabilities"]
    np.testing.assert_allclose(interpreter.get_tensor(out["index"]), saved.numpy(), atol=1e-5)


def test_below_min_accuracy_is_not_exported():
    with pytest.raises(RetrainError, match="below evaluate.min_accuracy"):
        check_accuracy(0.5, 0.9)
    check_accuracy(0.95, 0.9)


def test_predict_walks_folders_maps_names_and_survives_bad_files(exported, tmp_path, capsys):
    (tmp_path / "a_red.jpg").write_bytes(image_bytes("JPEG", COLOURS["red"], seed=11))
    (tmp_path / "b_broken.jpg").write_bytes(b"not an image at all")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c_green.webp").write_bytes(image_bytes("WEBP", COLOURS["green"], seed=12))
    (tmp_path / ".hidden.jpg").write_bytes(b"skipped")
    names = tmp_path.parent / f"{tmp_path.name}-names.json"
    names.write_text(json.dumps({"3": "Scarlet", "green": "Leafy"}))
    status = main(["predict", str(tmp_path), "--model", str(exported["dir"]), "--top_k", "1",
                   "--category_names", str(names), "--json"])
    results = json.loads(capsys.readouterr().out)
    assert status == 1  # one file failed, the others were answered
    assert [r["path"].rsplit("/", 1)[-1] for r in results] == ["a_red.jpg", "b_broken.jpg", "c_green.webp"]
    assert results[0]["predictions"] == [{"label": "Scarlet", "probability": pytest.approx(results[0]["predictions"][0]["probability"])}]
    assert "error" in results[1] and results[2]["predictions"][0]["label"] == "Leafy"


def test_predict_prints_every_label_without_top_k_and_saves_a_picture_headless(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    image = tmp_path / "blue.png"
    image.write_bytes(image_bytes("PNG", COLOURS["blue"], seed=13))
    assert main(["predict", str(image), "--model", str(exported["dir"]), "--show"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(image) and len(lines) == 4 and lines[1].split()[0] == "blue"
    assert (tmp_path / "blue.png.prediction.png").stat().st_size > 1000


def test_predict_without_a_model_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(tmp_path), "--model", str(tmp_path / "none")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.count("\n") == 1
