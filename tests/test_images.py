"""The one decoder: every supported format to upright RGB uint8, with plain TensorFlow ops."""

import hashlib
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from imagegen import image_bytes, jpeg_with_orientation, png_16bit_bytes
from retrain.images import PREPROCESSING_VERSION, decode_image, exif_orientation, resize_image


def _pil_upright(data: bytes) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpegs_are_turned_upright_like_photo_viewers_show_them(orientation, big_endian):
    data = jpeg_with_orientation(orientation, size=(48, 32), seed=orientation, big_endian=big_endian)
    assert int(exif_orientation(tf.constant(data))) == orientation
    decoded = decode_image(tf.constant(data)).numpy()
    expected = _pil_upright(data)
    assert decoded.shape == expected.shape == ((32, 48, 3) if orientation <= 4 else (48, 32, 3))
    assert np.abs(decoded.astype(int) - expected).max() <= 8  # libjpeg versions round differently


def test_the_serving_graph_decodes_a_batch_of_mixed_images():
    serve = tf.function(
        lambda batch: tf.map_fn(
            lambda b: resize_image(decode_image(b), (24, 24)), batch, fn_output_signature=tf.float32
        ),
        input_signature=[tf.TensorSpec([None], tf.string)],
    )
    batch = [jpeg_with_orientation(6), image_bytes("PNG", mode="RGBA"), image_bytes("GIF"), png_16bit_bytes()]
    images = serve(tf.constant(batch)).numpy()
    assert images.shape == (4, 24, 24, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_formats_without_exif_decode_unchanged():
    for data in [image_bytes(fmt, size=(40, 20)) for fmt in ("PNG", "WEBP", "BMP")]:
        assert int(exif_orientation(tf.constant(data))) == 1
        assert decode_image(tf.constant(data)).shape == (20, 40, 3)
    gray = decode_image(tf.constant(png_16bit_bytes(value=65535))).numpy()
    assert gray.dtype == np.uint8 and (gray == 255).all()


def test_bytes_that_are_no_image_raise_invalid_argument():
    for data in [b"", b"hello", image_bytes("JPEG")[:100]]:
        with pytest.raises(tf.errors.InvalidArgumentError):
            decode_image(tf.constant(data))


# What decode_image + resize_image give for fixed lossless images, per PREPROCESSING_VERSION. The
# feature cache trusts the version to name the pixels: change either function and this fails
# until the version is bumped (stale cached features would otherwise be reused silently).
PIXEL_FINGERPRINTS = {"2": "be2640f24bf7e42e"}


def _pixel_fingerprint() -> str:
    images = [image_bytes("PNG", (200, 40, 40), (40, 30), seed=3, mode="RGBA"), png_16bit_bytes(),
              image_bytes("GIF", (20, 200, 40), (33, 17), seed=5), image_bytes("BMP", (40, 20, 200), (20, 12), seed=6),
              image_bytes("PNG", (90, 90, 90), (25, 31), seed=7, mode="L")]
    digest = hashlib.sha256()
    for data in images:
        decoded = decode_image(tf.constant(data))
        digest.update(decoded.numpy().tobytes())  # lossless formats: exact on every machine
        resized = resize_image(decoded, (24, 24)).numpy()
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
