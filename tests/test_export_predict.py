"""The exported SavedModel takes image bytes; `retrain predict` uses it like predict.py did."""

import json
import os

import numpy as np
import pytest

from conftest import COLOURS
from imagegen import image_bytes
from retrain.cli import main
from retrain.errors import RetrainError
from retrain.tf.export import check_accuracy, check_reproduces, load_model


@pytest.fixture(scope="module")
def exported(colour_model_dir, colour_classifier):
    """The colour classifier exported with TFLite."""
    return {"dir": colour_model_dir, "paths": colour_classifier["paths"], "expected": colour_classifier["expected"]}


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

    from retrain.backbones.xnnpack import interpreter as litert

    interpreter = litert(model_path=str(exported["dir"] / "model.tflite"))
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
    status = main(
        [
            "predict",
            str(tmp_path),
            "--model",
            str(exported["dir"]),
            "--top_k",
            "1",
            "--category_names",
            str(names),
            "--json",
        ]
    )
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert status == 0  # a file in a folder that is no image is skipped with a note, not an error
    assert [r["path"].rsplit("/", 1)[-1] for r in results] == ["a_red.jpg", "c_green.webp"]
    assert f"skipped {tmp_path / 'b_broken.jpg'}: not an image" in captured.err
    assert "no display name for 'blue' (class 1)" in captured.err  # the partial names file says what it lacks
    serve = load_model(exported["dir"]).signatures["serving_default"]
    red = serve(image_bytes=np.array([(tmp_path / "a_red.jpg").read_bytes()], dtype=object))["probabilities"].numpy()[0]
    assert red.argmax() == 2 and red.max() > 0.5  # the SavedModel's own answer: "red", the 3rd label
    # predict ran model/model.tflite (LiteRT): the SavedModel's probabilities within 1e-4
    assert results[0]["predictions"] == [{"label": "Scarlet", "probability": pytest.approx(float(red.max()), abs=1e-4)}]
    assert results[0]["answer"] == "Scarlet" and results[1]["predictions"][0]["label"] == "Leafy"
    named = main(["predict", str(tmp_path / "b_broken.jpg"), "--model", str(exported["dir"])])
    assert named == 1 and "b_broken.jpg: error: not an image" in capsys.readouterr().out  # named: an error


def test_predict_prints_every_label_without_top_k_and_saves_a_picture_headless(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    image = tmp_path / "blue.png"
    image.write_bytes(image_bytes("PNG", COLOURS["blue"], seed=13))
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    (tmp_path / "here" / "blue.png.prediction.png").symlink_to(tmp_path / "victim")
    assert main(["predict", str(image), "--model", str(exported["dir"]), "--show", "--top_k", "9"]) == 1
    assert not (tmp_path / "victim").exists()  # --show never writes through a link
    (tmp_path / "here" / "blue.png.prediction.png").unlink()
    assert main(["predict", str(image), "--model", str(exported["dir"]), "--show", "--top_k", "9"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == str(image) and lines[-4] == str(image) and lines[-3].split()[0] == "blue"
    assert "--top_k 9 is more than the model's 3 classes" in captured.err
    assert (tmp_path / "here" / "blue.png.prediction.png").stat().st_size > 1000


def test_min_confidence_answers_unsure(exported, tmp_path, capsys):
    image = tmp_path / "red.png"
    image.write_bytes(image_bytes("PNG", COLOURS["red"], seed=5))
    assert (
        main(["predict", str(image), "--model", str(exported["dir"]), "--min_confidence", "0.9999999", "--json"]) == 0
    )
    (answer,) = json.loads(capsys.readouterr().out)
    assert answer["answer"] == "unsure" and answer["predictions"][0]["label"] == "red"
    assert main(["predict", str(image), "--model", str(exported["dir"]), "--min_confidence", "0.01"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "unsure" not in lines[0] and lines[1].split()[0] == "red"
    assert main(["predict", str(image), "--model", str(exported["dir"]), "--min_confidence", "1.0"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("(unsure)")
    with pytest.raises(SystemExit):
        main(["predict", str(image), "--min_confidence", "2"])


def test_predict_without_a_model_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(tmp_path), "--model", str(tmp_path / "none")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_category_names_leave_labels_that_already_are_display_names(tmp_path):
    from retrain.predict import load_category_names

    names = tmp_path / "label_map.json"
    names.write_text('{"1": "pink primrose", "2": "canterbury bells", "3": "sweet pea"}')
    # Classes named from the names file sort alphabetically: index 1 is not class id 1.
    assert load_category_names(names, ["canterbury bells", "pink primrose", "sweet pea"]) == [
        "canterbury bells",
        "pink primrose",
        "sweet pea",
    ]
    assert load_category_names(names, ["class_001", "class_002", "class_003"]) == [
        "pink primrose",
        "canterbury bells",
        "sweet pea",
    ]


def test_predict_never_blocks_on_a_fifo_or_a_device_and_names_odd_files_on_one_line(exported, tmp_path, capsys):
    import threading

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "red.png").write_bytes(image_bytes("PNG", COLOURS["red"], seed=2))
    os.mkfifo(folder / "pipe.jpg")  # nobody writes to it: reading it would wait forever
    odd = folder / "two\nlines.png"
    odd.write_bytes(image_bytes("PNG", COLOURS["green"], seed=3))
    outcome = {}
    worker = threading.Thread(
        target=lambda: outcome.update(
            folder=main(["predict", str(folder), "--model", str(exported["dir"]), "--top_k", "1"]),
            named=main(["predict", str(folder / "pipe.jpg"), "/dev/zero", "--model", str(exported["dir"])]),
        ),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "predict blocked on a FIFO or a device"
    captured = capsys.readouterr()
    assert outcome == {"folder": 0, "named": 1}
    assert f"skipped {folder / 'pipe.jpg'}: not an image" in captured.err
    assert f"{folder / 'pipe.jpg'}: error: not a regular file" in captured.out
    assert "/dev/zero: error: not a regular file" in captured.out
    assert f"{folder}/two\\nlines.png" in captured.out  # escaped: a file name cannot forge a result line
    assert not any(line.startswith("lines.png") for line in captured.out.splitlines())


@pytest.mark.parametrize("damage", ["foreign", "garbage", "truncated"])
def test_predict_with_a_model_that_is_not_ours_or_is_damaged_is_one_line(
    damage, exported, tiny_backbone, tmp_path, capsys
):
    import shutil

    if damage == "foreign":  # a SavedModel, but not one export wrote (no labels signature)
        model = tiny_backbone
    elif damage == "garbage":
        model = tmp_path / "broken"
        shutil.copytree(exported["dir"] / "saved_model", model)
        (model / "saved_model.pb").write_bytes(b"\x08\x01garbage" * 100)
    else:
        model = tmp_path / "cut.tflite"
        whole = (exported["dir"] / "model.tflite").read_bytes()
        model.write_bytes(whole[: len(whole) // 2])
    (tmp_path / "red.png").write_bytes(image_bytes("PNG", COLOURS["red"], seed=2))
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(tmp_path / "red.png"), "--model", str(model)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 1 and error.count("\n") == 1 and error.startswith(f"error: {model}"), error
    assert "Traceback" not in error


def test_predict_on_the_tflite_and_the_saved_models_own_decoder_agree_on_photo_like_jpegs(exported, tmp_path):
    """retrain predict (Pillow decode, numpy resize, LiteRT) against the SavedModel's in-graph
    decoder (what TF Serving runs), on JPEGs with photo-like detail, where a DCT or resize
    difference would show."""
    from PIL import Image

    from retrain.predict import load_classifier, predict_files
    from retrain.tf.export import SavedModelClassifier

    rng = np.random.default_rng(7)
    files = []
    for i in range(12):
        size = (int(rng.integers(120, 400)), int(rng.integers(90, 300)))
        y, x = np.mgrid[0 : size[1], 0 : size[0]]
        colour = np.array(list(COLOURS.values())[i % 3], np.float32)
        pixels = colour * (0.6 + 0.4 * np.sin(x / 7.0 + y / 11.0))[..., None] + rng.normal(0, 20, (*size[::-1], 3))
        files.append(tmp_path / f"photo{i}.jpg")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(files[-1], quality=int(rng.integers(60, 95)))
    lite, labels = load_classifier(exported["dir"])
    ours = predict_files(lite, files, labels, None)
    served = predict_files(SavedModelClassifier(exported["dir"]), files, labels, None)
    assert all(a.error is None for a in ours)
    assert [a.labels[0] for a in ours] == [b.labels[0] for b in served]
    worst = max(
        abs(dict(zip(a.labels, a.probabilities))[k] - dict(zip(b.labels, b.probabilities))[k])
        for a, b in zip(ours, served)
        for k in labels
    )
    assert worst <= 1e-3, worst
