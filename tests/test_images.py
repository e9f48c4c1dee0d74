"""The one decoder (Pillow + numpy, no TensorFlow) and its in-graph copy in the exported SavedModel.

Every supported format decodes to upright RGB uint8; `resize_image` is TensorFlow's bilinear
resize; and the serving graph (`retrain.tf.graph_images`) gives the same pixels, so `retrain
predict`, the served model and a TF Serving client agree with the features training saw.
"""

import hashlib
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from imagegen import image_bytes, jpeg_with_orientation, png_16bit_bytes
from retrain.images import PREPROCESSING_VERSION, ImageError, decode_image, resize_image
from retrain.tf import graph_images


def _pil_upright(data: bytes) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def _photo_like(seed: int, size=(97, 61)) -> bytes:
    """A JPEG with photo-like detail (smooth gradients and noise), so DCT differences would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    pixels = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) % 255], axis=2) + rng.normal(
        0, 25, (*size[::-1], 3)
    )
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=85)
    return out.getvalue()


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpegs_are_turned_upright_like_photo_viewers_show_them(orientation, big_endian):
    data = jpeg_with_orientation(orientation, size=(48, 32), seed=orientation, big_endian=big_endian)
    assert int(graph_images.exif_orientation(tf.constant(data))) == orientation
    decoded = decode_image(data)
    assert decoded.shape == ((32, 48, 3) if orientation <= 4 else (48, 32, 3))
    assert np.array_equal(decoded, _pil_upright(data))
    assert np.array_equal(graph_images.decode_image(tf.constant(data)).numpy(), decoded)  # the serving graph agrees


def test_the_serving_graph_gives_the_decoders_pixels_for_every_format():
    batch = [
        jpeg_with_orientation(6),
        _photo_like(1),
        _photo_like(2, (300, 200)),
        image_bytes("PNG", mode="RGBA"),
        image_bytes("GIF"),
        image_bytes("BMP"),
        image_bytes("WEBP"),
        png_16bit_bytes(),
    ]
    serve = tf.function(
        lambda batch: tf.map_fn(
            lambda b: graph_images.resize_image(graph_images.decode_image(b), (24, 31)),
            batch,
            fn_output_signature=tf.float32,
        ),
        input_signature=[tf.TensorSpec([None], tf.string)],
    )
    in_graph = serve(tf.constant(batch)).numpy()
    ours = np.stack([resize_image(decode_image(data), (24, 31)) for data in batch])
    assert ours.shape == (8, 24, 31, 3) and ours.dtype == np.float32
    assert np.abs(in_graph - ours).max() <= 1e-6


def test_formats_without_exif_decode_unchanged():
    for data in [image_bytes(fmt, size=(40, 20)) for fmt in ("PNG", "WEBP", "BMP")]:
        assert decode_image(data).shape == (20, 40, 3)
    gray = decode_image(png_16bit_bytes(value=65535))
    assert gray.dtype == np.uint8 and (gray == 255).all()


def test_bytes_that_are_no_image_are_refused_in_words():
    for data in [b"", b"hello", image_bytes("JPEG")[:100]]:
        with pytest.raises(ImageError):
            decode_image(data)
    with pytest.raises(ImageError, match="pixel limit"):
        decode_image(image_bytes("PNG", size=(40, 30)), max_pixels=1000)


# What decode_image + resize_image give for fixed lossless images, per PREPROCESSING_VERSION. The
# feature cache trusts the version to name the pixels: change either function and this fails
# until the version is bumped (stale cached features would otherwise be reused silently).
PIXEL_FINGERPRINTS = {"3": "be2640f24bf7e42e"}  # lossless: as version 2; JPEGs changed (DCT)


def _pixel_fingerprint() -> str:
    images = [
        image_bytes("PNG", (200, 40, 40), (40, 30), seed=3, mode="RGBA"),
        png_16bit_bytes(),
        image_bytes("GIF", (20, 200, 40), (33, 17), seed=5),
        image_bytes("BMP", (40, 20, 200), (20, 12), seed=6),
        image_bytes("PNG", (90, 90, 90), (25, 31), seed=7, mode="L"),
    ]
    digest = hashlib.sha256()
    for data in images:
        decoded = decode_image(data)
        digest.update(decoded.tobytes())  # lossless formats: exact on every machine
        resized = resize_image(decoded, (24, 24))
        digest.update(np.round(resized * 255).astype(np.uint8).tobytes())  # immune to last-bit float noise
    return digest.hexdigest()[:16]


def test_changing_the_pixels_requires_a_new_preprocessing_version(monkeypatch, tmp_path):
    assert PIXEL_FINGERPRINTS.get(PREPROCESSING_VERSION) == _pixel_fingerprint(), (
        "decode_image/resize_image now give other pixels: bump retrain.images.PREPROCESSING_VERSION "
        "and add its fingerprint here"
    )
    # ... and the version really keys the feature cache: entries of another version are not reused.
    import retrain.features as features

    root = tmp_path / "features"
    features.FeatureCache(root, "backbone", 4).put("ab" * 32, np.ones(4, np.float32))
    assert features.FeatureCache(root, "backbone", 4).get("ab" * 32) is not None
    monkeypatch.setattr(features, "PREPROCESSING_VERSION", "next")
    assert features.FeatureCache(root, "backbone", 4).get("ab" * 32) is None
