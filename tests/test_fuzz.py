"""Fuzzing the decode path: no bytes on disk can crash, hang or fool split or `retrain predict`.

Random bytes and mutated real images (bit flips, truncations, header edits, forged sizes) go
through split's per-file check and through predict's read + decode with a real exported model, in
this process (a crash in TensorFlow's decoders would take the test run down with it). Each must
come back as "usable" or as a one-line reason, and split may accept only what the model decodes.
The deadline is generous (a loaded machine) and catches hangs, not slowness.
"""

import base64
import collections
import math
import shutil
import struct

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagegen import image_bytes, jpeg_with_orientation, png_16bit_bytes, png_header_only
from retrain.backbones import load_backbone
from retrain.head import Head
from retrain.images import ImageError, decode_image
from retrain.limits import MAX_FILE_BYTES, MAX_IMAGE_PIXELS
from retrain.mlflow_model import checked_image
from retrain.predict import predict_files
from retrain.split import rejection_reason
from retrain.tf.export import build_classifier, load_model, save_classifier

LIMIT = 4_000_000  # pixels: small, so forged sizes cross it often and accepted images stay cheap
FUZZ = settings(
    max_examples=150,
    deadline=20_000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

SEEDS = {
    "jpeg": image_bytes("JPEG", (200, 40, 40), (40, 30), seed=1),
    "exif_jpeg": jpeg_with_orientation(6),
    "progressive_jpeg": image_bytes("JPEG", (40, 200, 40), (40, 30), seed=2, progressive=True),
    "png": image_bytes("PNG", (40, 40, 200), (40, 30), seed=3),
    "rgba_png": image_bytes("PNG", (40, 40, 200), (24, 24), seed=4, mode="RGBA"),
    "png16": png_16bit_bytes(),
    "gif": image_bytes("GIF", (200, 200, 40), (40, 30), seed=5),
    "bmp": image_bytes("BMP", (40, 200, 200), (20, 12), seed=6),
    "webp": image_bytes("WEBP", (200, 40, 200), (40, 30), seed=7),
}


@st.composite
def mutated_images(draw):
    """A real image with one to three mutations: bit flips, header edits, truncation, forged size."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "header", "truncate", "forge_size", "splice"]))
        if kind == "flip" and data:
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "header":  # overwrite bytes where formats keep sizes, depths and offsets
            at = draw(st.integers(4, max(4, min(64, len(data)))))  # mostly past the magic number
            data[at : at + 4] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "truncate":
            data = data[: draw(st.integers(len(data) // 4, len(data)))]
        elif kind == "forge_size":  # a plausible-looking big width/height at a random place
            at = draw(st.integers(0, max(0, min(200, len(data) - 4))))
            side = draw(st.integers(0, 0xFFFF))
            data[at : at + 4] = struct.pack(draw(st.sampled_from([">HH", "<HH"])), side, side)
        elif kind == "splice":  # a chunk of another format's bytes in the middle
            other = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
            at = draw(st.integers(min(16, len(data)), len(data)))
            data[at:at] = other[: draw(st.integers(1, 64))]
    return bytes(data)


ANY_BYTES = st.one_of(mutated_images(), st.binary(max_size=1024))  # first: hypothesis favours it


def _decodes(data: bytes) -> bool:
    try:
        decode_image(data, LIMIT)
    except ImageError:
        return False
    return True


@FUZZ
@given(data=ANY_BYTES)
def test_splits_check_never_crashes_and_accepts_only_what_decodes(data):
    reason = rejection_reason(data, LIMIT)
    if reason is None:
        assert _decodes(data)  # split's promise: training can read every image it accepts
    else:
        assert isinstance(reason, str) and reason and "\n" not in reason


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_backbone):
    """A real exported model (tiny backbone, fixed head): saved_model/ and model.tflite."""
    backbone = load_backbone(str(tiny_backbone))
    kernel = np.random.default_rng(0).normal(size=(backbone.feature_dim, 3)).astype(np.float32)
    head = Head([kernel], [np.zeros(3, np.float32)], ["softmax"])
    out = tmp_path_factory.mktemp("fuzz-model") / "model"
    save_classifier(build_classifier(backbone, head, ["a", "b", "c"], top_k=2), out, tflite=True)
    return out


@pytest.fixture(scope="module")
def model(model_dir):
    """What `retrain predict` runs by default: the exported folder's model.tflite (LiteRT)."""
    from retrain.predict import load_classifier

    return load_classifier(model_dir)[0]


@settings(FUZZ, max_examples=60)
@given(data=ANY_BYTES)
def test_predict_answers_or_names_the_problem_for_any_file(model, tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "input.jpg"
    path.write_bytes(data)
    (result,) = predict_files(model, [path], ["a", "b", "c"], top_k=2)
    if result.error is None:
        assert len(result.labels) == 2 and 0.0 <= result.probabilities[0] <= 1.0
    else:
        assert result.error and "\n" not in result.error


@settings(FUZZ, max_examples=60)
@given(data=ANY_BYTES)
def test_the_served_models_input_check_never_crashes(data):
    from mlflow.exceptions import MlflowException

    try:
        assert checked_image(0, data) == data
    except MlflowException as error:
        assert error.message.startswith("image 0: ") and "\n" not in error.message


def test_the_fuzzer_reaches_both_outcomes():
    """The inputs the fuzz tests draw are neither all harmless nor all fatal: counted over the same
    derandomized draws, split accepts some and rejects others, for more than one reason."""
    assert all(rejection_reason(seed, LIMIT) is None for seed in SEEDS.values())
    outcomes, reasons = collections.Counter(), collections.Counter()

    @FUZZ
    @given(data=ANY_BYTES)
    def draw(data):
        reason = rejection_reason(data, LIMIT)
        outcomes["accepted" if reason is None else "rejected"] += 1
        reasons[(reason or "").split(" ")[0]] += 1

    draw()
    assert outcomes["accepted"] >= 10 and outcomes["rejected"] >= 10, outcomes
    assert len(reasons) >= 4, reasons  # several kinds of damage, not one failure over and over
    assert MAX_IMAGE_PIXELS > LIMIT


# --- the limits, one by one ---------------------------------------------------------------------


def test_predict_refuses_oversized_files_and_pixel_bombs_from_the_header(model, tmp_path):
    big = tmp_path / "big.jpg"
    with open(big, "wb") as handle:  # sparse: nothing is written, and predict must not read it
        handle.truncate(MAX_FILE_BYTES + 1)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(100_000, 100_000))  # 30 GB of pixels if it were decoded
    just_over = tmp_path / "just_over.png"
    side = math.isqrt(MAX_IMAGE_PIXELS) + 1
    just_over.write_bytes(png_header_only(side, side))
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    good = tmp_path / "good.webp"
    good.write_bytes(SEEDS["webp"])
    results = predict_files(model, [big, bomb, just_over, text, good], ["a", "b", "c"], top_k=1)
    assert [r.error for r in results] == [
        f"{MAX_FILE_BYTES + 1} bytes, over the {MAX_FILE_BYTES} byte limit",
        f"100000x100000 pixels, over the {MAX_IMAGE_PIXELS} pixel limit",  # from the header: TF never saw it
        f"{side}x{side} pixels, over the {MAX_IMAGE_PIXELS} pixel limit",
        "not an image (text file)",
        None,
    ]


def test_the_served_mlflow_model_refuses_oversized_and_bomb_images_with_a_clear_message(model_dir, tmp_path):
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from retrain.pyfunc import pyfunc_model, write_classes

    served_dir = tmp_path / "export"
    shutil.copytree(model_dir, served_dir)
    write_classes(served_dir, ["a", "b", "c"], 2)
    mlflow.pyfunc.save_model(tmp_path / "pyfunc", **pyfunc_model(served_dir))
    served = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))
    answer = served.predict(pd.DataFrame({"image": [SEEDS["jpeg"], base64.b64encode(SEEDS["png"]).decode()]}))
    assert list(answer.columns) == ["label", "probability", "top_k_labels", "top_k_probabilities"] and len(answer) == 2
    refused = {
        "bomb": (
            png_header_only(100_000, 100_000),
            f"image 1: 100000x100000 pixels, over the {MAX_IMAGE_PIXELS} pixel limit",
        ),
        "just over": (
            png_header_only(9460, 9460),
            f"image 1: 9460x9460 pixels, over the {MAX_IMAGE_PIXELS} pixel limit",
        ),
        "too big": (
            SEEDS["jpeg"] + bytes(MAX_FILE_BYTES),
            f"image 1: {len(SEEDS['jpeg']) + MAX_FILE_BYTES} bytes, over",
        ),
        "no image": (b"GIF89a" + bytes(3), "image 1: not an image"),
    }
    for case, (payload, message) in refused.items():
        with pytest.raises(MlflowException) as error:
            served.predict(pd.DataFrame({"image": [SEEDS["jpeg"], payload]}))
        assert error.value.message.startswith(message), case
        assert error.value.get_http_status_code() == 400, case


# --- the SavedModel's own limit: any client of serving_default is protected -------------------


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF header is edited to claim width x height (its data stays small)."""
    data = bytearray(SEEDS["jpeg"])
    sof = next(i for i in range(2, len(data) - 9) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _pil(fmt: str, size, mode="RGB", **options) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size, (200, 40, 40, 255)[: len(mode)] if mode != "L" else 128).save(buffer, fmt, **options)
    return buffer.getvalue()


_FORMATS = {  # every format split accepts, and each WebP flavour (lossy, lossless, extended)
    "jpeg": lambda size: _pil("JPEG", size),
    "png": lambda size: _pil("PNG", size),
    "gif": lambda size: _pil("GIF", size),
    "bmp": lambda size: _pil("BMP", size),
    "webp-lossy": lambda size: _pil("WEBP", size),
    "webp-lossless": lambda size: _pil("WEBP", size, lossless=True),
    "webp-extended": lambda size: _pil("WEBP", size, mode="RGBA"),
}


@pytest.fixture(scope="module")
def small_limit_serve(tmp_path_factory, tiny_backbone):
    """serving_default of a real exported model whose pixel limit is 10,000 (100x100)."""
    backbone = load_backbone(str(tiny_backbone))
    head = Head([np.ones((backbone.feature_dim, 2), np.float32)], [np.zeros(2, np.float32)], ["softmax"])
    out = tmp_path_factory.mktemp("small-limit") / "model"
    save_classifier(build_classifier(backbone, head, ["a", "b"], top_k=1, max_image_pixels=10_000), out, tflite=False)
    return load_model(out).signatures["serving_default"]


@pytest.mark.parametrize("fmt", list(_FORMATS))
def test_the_saved_models_pixel_limit_reads_every_formats_header(small_limit_serve, fmt):
    served = small_limit_serve(image_bytes=tf.constant([_FORMATS[fmt]((100, 100))]))  # exactly the limit
    assert served["probabilities"].shape == (1, 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="more than the 10000 pixel limit"):
        small_limit_serve(image_bytes=tf.constant([_FORMATS[fmt]((101, 100))]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="more than the 10000 pixel limit"):
        small_limit_serve(image_bytes=tf.constant([_FORMATS["png"]((8, 8)), _FORMATS[fmt]((10, 1001))]))


def test_header_only_bombs_sent_to_the_saved_model_fail_fast_with_a_message(model_dir):
    """serving_default called directly, as the README shows: no gigabytes allocated, one clear error."""
    import resource

    serve = load_model(model_dir).signatures["serving_default"]
    bombs = {
        "png 100000x100000": png_header_only(100_000, 100_000),
        "png just over": png_header_only(math.isqrt(MAX_IMAGE_PIXELS) + 1, math.isqrt(MAX_IMAGE_PIXELS) + 1),
        "jpeg 65000x65000": _jpeg_claiming(65_000, 65_000),
        "jpeg 10000x9000": _jpeg_claiming(10_000, 9_000),
        "gif 65535x65535": b"GIF89a" + struct.pack("<HH", 65535, 65535) + bytes(7) + b";",
        "bmp 60000x60000": b"BM" + bytes(16) + struct.pack("<ii", 60_000, -60_000) + bytes(30),
        "webp 16383x16383": b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(10) + struct.pack("<HH", 16383, 16383) + bytes(8),
    }
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, bomb in bombs.items():
        with pytest.raises(tf.errors.InvalidArgumentError) as error:
            serve(image_bytes=tf.constant([SEEDS["jpeg"], bomb]))
        assert f"more than the {MAX_IMAGE_PIXELS} pixel limit" in error.value.message, name
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mb < 200, f"peak memory grew {grown_mb:.0f} MB"  # one decoded bomb is 1-30 GB
    ok = serve(image_bytes=tf.constant([SEEDS["jpeg"], SEEDS["png"]]))
    assert ok["probabilities"].shape == (2, 3)  # ordinary images still pass
