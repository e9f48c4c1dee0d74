"""TFLite for phones: four variants judged on a test split, MediaPipe as the client, predict on .tflite."""

import contextlib
import io
import json
import shutil

import numpy as np
import pytest

from conftest import COLOURS
from default_params import default_params, default_raw
from imagegen import image_bytes
from retrain.backbones.xnnpack import interpreter_class
from retrain.cli import main
from retrain.errors import RetrainError
from retrain.params import parse_params
from retrain.predict import predict_files
from retrain.tf.export import SavedModelClassifier
from retrain.tf.tflite_convert import convert, export_variants
from retrain.tflite_variants import TfliteModel, file_name

FILES = ["model.tflite", "model_float16.tflite", "model_dynamic_range.tflite", "model_int8.tflite"]


def colour_images(folder, per_class=3):
    """JPEGs of each colour, unseen in training (other seeds, another size): (paths, label indices)."""
    paths, labels = [], []
    for index, (label, colour) in enumerate(COLOURS.items()):
        for seed in range(per_class):
            path = folder / f"{label}_{seed}.jpg"
            path.write_bytes(image_bytes("JPEG", colour, (56, 40), seed=100 + seed))
            paths.append(str(path))
            labels.append(index)
    return paths, np.array(labels)


def run_export(classifier, out_dir, train_paths, test, **export_changes):
    """export_variants with the tests' export section (changed as asked); (metrics, printed lines)."""
    export = default_params().export.model_copy(update=export_changes)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        metrics = export_variants(classifier, out_dir, export, 0, train_paths, *test)
    return metrics, printed.getvalue().splitlines()


@pytest.fixture(scope="module")
def variants(tmp_path_factory, colour_classifier, colour_model_dir):
    """The colour classifier exported as the stage does: SavedModel and model.tflite, then the variants."""
    out = tmp_path_factory.mktemp("tflite") / "model"
    shutil.copytree(colour_model_dir, out)
    test = colour_images(tmp_path_factory.mktemp("tflite-test"))
    metrics, printed = run_export(
        colour_classifier["classifier"],
        out,
        colour_classifier["paths"],
        test,
        tflite_quantized=["float16", "dynamic_range", "int8"],
    )  # the phone release's list
    return {"dir": out, "metrics": metrics, "printed": printed, "test": test}


def test_four_variants_are_evaluated_and_written_with_metadata(variants):
    out, metrics = variants["dir"], variants["metrics"]
    report = json.loads((out / "tflite_metrics.json").read_text())
    assert sorted(report["variants"]) == ["dynamic_range", "float16", "float32", "int8"]
    assert report["test_images"] == 9 and report["representative_images"] == 30
    sizes = {}
    for variant, result in report["variants"].items():
        assert result["written"] and result["refused"] is None and (out / result["file"]).is_file()
        assert result["accuracy"] == metrics[f"tflite_{variant}_accuracy"] == 1.0  # solid colours: all right
        assert result["latency_ms"] == metrics[f"tflite_{variant}_latency_ms"] > 0
        sizes[variant] = result["size_bytes"]
        assert sizes[variant] == (out / result["file"]).stat().st_size == metrics[f"tflite_{variant}_size_bytes"]
    assert max(sizes["float16"], sizes["dynamic_range"], sizes["int8"]) < sizes["float32"]
    assert sorted(p.name for p in out.glob("*.tflite")) == sorted(FILES)
    assert [line.split(":")[0] for line in variants["printed"]] == ["float32", "float16", "dynamic_range", "int8"]


def test_each_file_says_its_input_type_and_embeds_the_labels(variants):
    for name in FILES:
        model = TfliteModel.from_file(variants["dir"] / name)
        assert model.labels == list(COLOURS)  # from the metadata: no labels.txt read
        assert (model.metadata.mean, model.metadata.std) == ((0.0,), (255.0,))
        (inp,) = interpreter_class()(model_path=str(variants["dir"] / name)).get_input_details()
        if name == "model_int8.tflite":  # uint8 pixels as a camera gives them: scale 1/255, zero point 0
            assert inp["dtype"] == np.uint8 and inp["quantization"] == (pytest.approx(1 / 255), 0)
        else:
            assert inp["dtype"] == np.float32


def test_mediapipe_image_classifier_loads_each_file_and_names_the_class(variants, tmp_path):
    import mediapipe as mp
    from mediapipe.tasks.python import vision

    for label, colour in COLOURS.items():
        (tmp_path / f"{label}.png").write_bytes(image_bytes("PNG", colour, (64, 64), seed=7))
    for name in FILES:
        with vision.ImageClassifier.create_from_model_path(str(variants["dir"] / name)) as classifier:
            for label in COLOURS:
                result = classifier.classify(mp.Image.create_from_file(str(tmp_path / f"{label}.png")))
                best = result.classifications[0].categories[0]
                assert (name, best.category_name) == (name, label) and best.score > 0.5


def test_drop_gate_refuses_int8_calibrated_on_unlike_images(variants, colour_classifier, tmp_path):
    black = []
    for i in range(4):  # calibration that never sees colour: int8's activation ranges miss the test images
        black.append(str(tmp_path / f"black_{i}.png"))
        (tmp_path / f"black_{i}.png").write_bytes(image_bytes("PNG", (0, 0, 0), (48, 48), seed=i))
    out = tmp_path / "model"
    out.mkdir()
    shutil.copy(variants["dir"] / "model.tflite", out)
    metrics, printed = run_export(
        colour_classifier["classifier"], out, black, variants["test"], tflite_quantized=["int8"]
    )
    assert metrics["tflite_int8_written"] == 0 and metrics["tflite_int8_accuracy"] < 0.99
    assert not (out / "model_int8.tflite").exists()
    refused = json.loads((out / "tflite_metrics.json").read_text())["variants"]["int8"]["refused"]
    assert printed[-1] == refused and refused.startswith("int8: refused, test accuracy")
    assert "points below float32's 1.0000 (export.max_quantization_drop 1.0); model_int8.tflite not written" in refused
    metrics, _ = run_export(
        colour_classifier["classifier"],
        out,
        black,
        variants["test"],
        tflite_quantized=["int8"],
        max_quantization_drop=100.0,
    )
    assert metrics["tflite_int8_written"] == 1 and (out / "model_int8.tflite").is_file()  # the gate, not the model


def test_predict_on_a_tflite_takes_the_same_flags_and_labels_from_its_metadata(variants, tmp_path, capsys):
    alone = tmp_path / "phone" / "model_int8.tflite"  # no labels.txt beside it
    alone.parent.mkdir()
    shutil.copy(variants["dir"] / "model_int8.tflite", alone)
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a_red.jpg").write_bytes(image_bytes("JPEG", COLOURS["red"], seed=11))
    (images / "b_broken.jpg").write_bytes(b"not an image at all")
    (images / "sub" / "c_green.webp").write_bytes(image_bytes("WEBP", COLOURS["green"], seed=12))
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"3": "Scarlet", "green": "Leafy"}))
    status = main(
        ["predict", str(images), "--model", str(alone), "--top_k", "1", "--category_names", str(names), "--json"]
    )
    results = json.loads(capsys.readouterr().out)
    assert status == 0 and [r["path"].rsplit("/", 1)[-1] for r in results] == [
        "a_red.jpg",
        "c_green.webp",
    ]  # text skipped
    assert [r["predictions"][0]["label"] for r in results] == ["Scarlet", "Leafy"]
    assert len(results[0]["predictions"]) == 1


def test_predict_on_float_tflite_gives_the_saved_models_probabilities(variants, tmp_path, capsys, monkeypatch):
    image = tmp_path / "blue.png"
    image.write_bytes(image_bytes("PNG", COLOURS["blue"], (70, 50), seed=13))
    saved = predict_files(SavedModelClassifier(variants["dir"]), [image], list(COLOURS), None)[0]
    lite = predict_files(TfliteModel.from_file(variants["dir"] / "model.tflite"), [image], list(COLOURS), None)[0]
    assert lite.labels == saved.labels and lite.labels[0] == "blue"
    np.testing.assert_allclose(
        lite.probabilities, saved.probabilities, atol=1e-4
    )  # the metadata's normalisation applied
    monkeypatch.delenv("DISPLAY", raising=False)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")  # --show saves where the user is, never beside the photo
    assert main(["predict", str(image), "--model", str(variants["dir"] / "model_float16.tflite"), "--show"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(image) and len(lines) == 4 and lines[1].split()[0] == "blue"
    assert (tmp_path / "here" / "blue.png.prediction.png").stat().st_size > 1000
    assert not (tmp_path / "blue.png.prediction.png").exists()


def test_a_tflite_without_metadata_is_one_line(colour_classifier, tmp_path, capsys):
    bare = tmp_path / "bare.tflite"
    bare.write_bytes(convert(colour_classifier["classifier"], "float32"))
    (tmp_path / "x.png").write_bytes(image_bytes("PNG", COLOURS["red"], seed=1))
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(tmp_path / "x.png"), "--model", str(bare)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 1 and error.count("\n") == 1 and "bare.tflite: no TFLite metadata" in error
    with pytest.raises(RetrainError, match="missing.tflite: cannot read"):
        TfliteModel.from_file(tmp_path / "missing.tflite")


def test_unknown_quantization_names_the_key():
    raw = default_raw(**{"export.tflite_quantized": ["int4"]})
    with pytest.raises(RetrainError, match=r"'export\.tflite_quantized\.0'"):
        parse_params(raw)
    assert file_name("float32") == "model.tflite" and file_name("int8") == "model_int8.tflite"


def test_export_reuses_the_backbones_conversion_and_writes_each_heads_weights_in(tiny_backbone, tmp_path, monkeypatch):
    import tensorflow as tf

    from retrain.backbones import load_backbone
    from retrain.head import Head
    from retrain.tf import tflite_convert
    from retrain.tf.export import build_classifier

    monkeypatch.setenv("RETRAIN_CACHE_DIR", str(tmp_path / "cache"))
    backbone = load_backbone(str(tiny_backbone))
    rng = np.random.default_rng(1)

    def classifier(seed):
        rng = np.random.default_rng(seed)
        head = Head(
            [rng.normal(size=(backbone.feature_dim, 6)).astype(np.float32), rng.normal(size=(6, 3)).astype(np.float32)],
            [rng.normal(size=6).astype(np.float32), rng.normal(size=3).astype(np.float32)],
            ["tanh", "softmax"],
        )
        return build_classifier(backbone, head, ["a", "b", "c"], top_k=1)

    first = tflite_convert.float32_model(classifier(1))
    (template,) = (tmp_path / "cache").rglob("classifiers/*.tflite")
    converted = []
    monkeypatch.setattr(tflite_convert, "convert", lambda *args: converted.append(args) or b"")  # must not be needed
    second = tflite_convert.float32_model(classifier(2))
    assert not converted and second != first and len(second) == len(first) == template.stat().st_size
    images = rng.random((3, *backbone.image_size, 3)).astype(np.float32)
    from retrain.backbones.xnnpack import interpreter

    for seed, model in ((1, first), (2, second)):
        runner = interpreter(model_content=model, num_threads=1)
        expected = classifier(seed).classify_images(tf.constant(images))["probabilities"].numpy()
        for image, probabilities in zip(images, expected):
            runner.set_tensor(runner.get_input_details()[0]["index"], image[None])
            runner.invoke()
            np.testing.assert_allclose(
                runner.get_tensor(runner.get_output_details()[0]["index"])[0], probabilities, atol=1e-5
            )


def test_export_saves_each_heads_savedmodel_from_the_graph_it_kept(tiny_backbone, tmp_path, monkeypatch):
    """The second head of the same shapes is saved without tracing: the kept graph, its own weights
    and labels (its serving signature, labels and fingerprint are its own)."""
    import tensorflow as tf

    from imagegen import image_bytes
    from retrain.backbones import load_backbone
    from retrain.head import Head
    from retrain.tf.export import build_classifier, load_model, save_classifier

    monkeypatch.setenv("RETRAIN_CACHE_DIR", str(tmp_path / "cache"))
    backbone = load_backbone(str(tiny_backbone))

    def classifier(seed, labels):
        rng = np.random.default_rng(seed)
        head = Head(
            [rng.normal(size=(backbone.feature_dim, 6)).astype(np.float32), rng.normal(size=(6, 3)).astype(np.float32)],
            [rng.normal(size=6).astype(np.float32), rng.normal(size=3).astype(np.float32)],
            ["relu", "softmax"],
        )
        return build_classifier(backbone, head, labels, top_k=2)

    save_classifier(classifier(1, ["a", "b", "c"]), tmp_path / "first", tflite=False)
    (template,) = (tmp_path / "cache").rglob("classifiers/*.savedmodel")
    monkeypatch.setattr(tf.saved_model, "save", lambda *a, **k: pytest.fail("traced and saved again"))
    save_classifier(classifier(2, ["x", "y", "z"]), tmp_path / "second", tflite=False)
    images = np.random.default_rng(3).random((4, *backbone.image_size, 3)).astype(np.float32)
    for seed, name, labels in ((1, "first", ["a", "b", "c"]), (2, "second", ["x", "y", "z"])):
        model = load_model(tmp_path / name)
        got = model.signatures["classify_images"](images=tf.constant(images))["probabilities"].numpy()
        expected = classifier(seed, labels).classify_images(tf.constant(images))["probabilities"].numpy()
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert [v.decode() for v in model.signatures["labels"]()["labels"].numpy()] == labels
        served = model.signatures["serving_default"](image_bytes=tf.constant([image_bytes("PNG", (200, 30, 30))]))
        assert [v.decode() for v in served["top_k_labels"].numpy()[0]] == [
            labels[i] for i in served["top_k_indices"][0]
        ]
    fingerprints = {(tmp_path / n / "saved_model" / "fingerprint.pb").read_bytes() for n in ("first", "second")}
    assert len(fingerprints) == 2
