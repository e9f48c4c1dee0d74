"""The one image decoder, shared by split, bottlenecks, evaluate's model, predict and serving.

Training and serving must see the same pixels, so every path that turns image bytes into model
input in Python goes through `decode_image` and `resize_image` here: split uses them to decide
which files are usable, bottlenecks to compute features, `retrain predict` and the served MLflow
model to classify. No TensorFlow: Pillow (libjpeg-turbo) decodes, numpy resizes.

The exported SavedModel keeps an in-graph copy for TF Serving users (`retrain.tf.graph_images`):
JPEGs with libjpeg's accurate integer DCT (what Pillow uses; TensorFlow's default, the fast DCT,
differs by up to 21 levels), EXIF orientation applied the same way, and TensorFlow's bilinear
resize (half-pixel centres, no antialiasing), which `resize_image` computes in numpy.
tests/test_images.py checks the two give the same pixels. Changing either changes features, so
bump `PREPROCESSING_VERSION`: it is part of every feature-cache key.
"""

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from retrain.limits import MAX_IMAGE_PIXELS

# 2: JPEGs are turned upright by their EXIF Orientation tag, as photo viewers show them.
# 3: decoded without TensorFlow: JPEG's accurate integer DCT (Pillow's) instead of TF's fast one.
PREPROCESSING_VERSION = "3"

# Formats the decoder reads (MPO is a multi-picture JPEG from cameras; it decodes as JPEG).
FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP")
_OPENERS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")  # Pillow's JPEG opener reads MPO files too


class ImageError(ValueError):
    """Bytes that are no decodable image of a supported format (the message says why)."""


def decode_image(contents: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, GIF first frame, BMP, WebP) to upright RGB.

    Returns uint8 [H, W, 3]: grayscale replicated, alpha dropped, palette expanded, 16-bit scaled
    to 8, and a JPEG turned by its EXIF Orientation tag. Raises ImageError for bytes that are no
    decodable image, or whose header announces more than max_pixels (before any pixel is decoded).
    """
    Image.init()  # every plugin registered: `formats` names some that preinit leaves out
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: the limit is checked below
            with Image.open(io.BytesIO(contents), formats=_OPENERS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(f"{width}x{height} pixels, over the {max_pixels} pixel limit")
                if image.format in ("JPEG", "MPO"):
                    image = ImageOps.exif_transpose(image)
                return _rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"over the {max_pixels} pixel limit") from None
    except Exception as error:  # Pillow raises many types for damaged data
        raise ImageError(f"cannot be decoded ({type(error).__name__}: {str(error)[:160]})") from None


def _rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: the top 8 bits, as TF does
        pixels = np.asarray(image, dtype=np.uint32) >> 8
        return np.repeat(np.clip(pixels, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB") if image.mode in ("P", "PA", "LA") else image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def sniff_image(data: bytes) -> tuple[str, tuple[int, int]] | None:
    """(PIL format, (width, height)) from the header alone, or None if no plugin recognises it.

    Image.open would do this but applies PIL's global decompression-bomb limit; this is its
    format loop without that check, so the caller's pixel limit alone decides and nothing is
    decoded. split, `retrain predict` and the served model check files with it.
    """
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            accepted = accept(prefix) if accept else True
            if not accepted or isinstance(accepted, str):  # a str is PIL's "almost, but no"
                continue
            image = factory(io.BytesIO(data), None)
            return fmt, image.size
        except Exception:  # any bytes can arrive here: a plugin that chokes on them just says no
            continue
    return None


def resize_image(image: np.ndarray, size) -> np.ndarray:
    """uint8 [H, W, 3] → float32 [size[0], size[1], 3] in [0, 1]: TensorFlow's bilinear resize
    (`tf.image.resize(..., "bilinear")`: half-pixel centres, no antialiasing), in float32.

    The four neighbours are gathered as uint8 from the image seen as [H, W*3] (a gather along the
    last axis is several times cheaper than one along the middle axis of [H, W, 3]), then scaled
    and blended in TensorFlow's order, so the result is TensorFlow's to the bit.
    """
    height, width = image.shape[:2]
    (top, bottom, y_lerp), (left, right, x_lerp) = _weights(height, size[0]), _weights(width, size[1])
    flat = np.ascontiguousarray(image).reshape(height, width * 3)
    channels = np.arange(3)
    left, right = (left[:, None] * 3 + channels).ravel(), (right[:, None] * 3 + channels).ravel()
    scale = np.float32(1.0 / 255)
    x_lerp = np.repeat(x_lerp, 3)
    blended = []
    for rows in (flat[top], flat[bottom]):
        first = np.take(rows, left, axis=1).astype(np.float32) * scale
        second = np.take(rows, right, axis=1).astype(np.float32) * scale
        blended.append(first + (second - first) * x_lerp)
    upper, lower = blended
    return (upper + (lower - upper) * y_lerp[:, None]).reshape(size[0], size[1], 3)


def _weights(in_size: int, out_size: int):
    """Source rows (or columns) below and above each output one, and the weight of the second."""
    scale = np.float32(in_size / out_size)
    position = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(position)
    low = np.clip(floor, 0, in_size - 1).astype(np.intp)
    high = np.clip(np.ceil(position), 0, in_size - 1).astype(np.intp)
    return low, high, (position - floor).astype(np.float32)


def load_image(path, size) -> np.ndarray:
    """A file → float32 [size[0], size[1], 3] in [0, 1], as bottlenecks and predict feed the model."""
    with open(path, "rb") as handle:
        return resize_image(decode_image(handle.read()), size)
