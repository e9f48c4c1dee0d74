"""The one decoder: every supported format to upright RGB uint8, with plain TensorFlow ops."""

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


def test_preprocessing_version_names_the_exif_change():
    assert PREPROCESSING_VERSION == "2"
