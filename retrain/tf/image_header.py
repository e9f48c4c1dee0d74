"""Image dimensions from the header alone, in TensorFlow ops: the serving graph's bomb check.

A 100 kB file can claim 100,000 x 100,000 pixels and make a decoder allocate 30 GB. Split and
`retrain predict` refuse such files with PIL before decoding; the exported SavedModel must protect
any client that calls `serving_default` directly, so the same check lives in its graph:
`check_pixels` reads width and height from the header (JPEG SOF via `tf.io.extract_jpeg_shape`,
PNG IHDR, GIF logical screen, BMP info header, WebP VP8/VP8L/VP8X) and fails with an
InvalidArgumentError naming the limit before `decode_image` runs. Bytes of no known format pass
through: the decoder then refuses them with its own error.
"""

import tensorflow as tf

from retrain.limits import MAX_IMAGE_PIXELS

_HEAD_BYTES = 32  # every format here keeps its size within the first 30 bytes


def _head(contents):
    """The first 32 bytes as int64 [32] (zeros past the end of a short file)."""
    raw = tf.io.decode_raw(tf.strings.substr(contents, 0, _HEAD_BYTES), tf.uint8)
    return tf.cast(tf.concat([raw, tf.zeros([_HEAD_BYTES], tf.uint8)], 0)[:_HEAD_BYTES], tf.int64)


def _starts_with(head, prefix: bytes, at: int = 0):
    return tf.reduce_all(tf.equal(head[at : at + len(prefix)], tf.constant(list(prefix), tf.int64)))


def _little(head, at: int, size: int):
    return sum(head[at + i] * (256**i) for i in range(size))


def _big(head, at: int, size: int):
    return sum(head[at + i] * (256 ** (size - 1 - i)) for i in range(size))


def _webp_size(head):
    """(width, height) of a RIFF/WEBP header: lossy VP8, lossless VP8L or extended VP8X."""
    lossy = (_little(head, 26, 2) % 16384, _little(head, 28, 2) % 16384)
    bits = _little(head, 21, 4)  # VP8L: 14 bits width-1, 14 bits height-1
    lossless = (bits % 16384 + 1, (bits // 16384) % 16384 + 1)
    extended = (_little(head, 24, 3) + 1, _little(head, 27, 3) + 1)  # VP8X canvas
    is_lossless, is_extended = _starts_with(head, b"VP8L", 12), _starts_with(head, b"VP8X", 12)
    pick = lambda i: tf.where(is_extended, extended[i], tf.where(is_lossless, lossless[i], lossy[i]))  # noqa: E731
    return pick(0), pick(1)


def header_pixels(contents):
    """Pixels (width * height, int64 scalar) that the header of encoded image bytes announces.

    contents: scalar tf.string. 0 for bytes of no known format (the decoder refuses those); a
    JPEG whose header libjpeg cannot read raises InvalidArgumentError here, as decoding would.
    """
    head = _head(contents)
    zero = tf.constant(0, tf.int64)

    def jpeg():
        shape = tf.io.extract_jpeg_shape(contents, output_type=tf.int64)
        return shape[0] * shape[1]

    def webp():
        width, height = _webp_size(head)
        return width * height

    cases = [
        (_starts_with(head, b"\x89PNG\r\n\x1a\n"), lambda: _big(head, 16, 4) * _big(head, 20, 4)),
        (_starts_with(head, b"GIF8"), lambda: _little(head, 6, 2) * _little(head, 8, 2)),
        (_starts_with(head, b"BM"), lambda: _little(head, 18, 4) * tf.abs(_signed32(_little(head, 22, 4)))),
        (_starts_with(head, b"RIFF") & _starts_with(head, b"WEBP", 8), webp),
        (_starts_with(head, b"\xff\xd8"), jpeg),
    ]
    return tf.case(cases, default=lambda: zero, exclusive=True)


def _signed32(value):
    """A BMP height is signed: negative means the rows are stored top-down."""
    return tf.where(value >= 2**31, value - 2**32, value)


def check_pixels(contents, max_pixels: int = MAX_IMAGE_PIXELS):
    """An op that fails (InvalidArgumentError) when the header announces more than max_pixels."""
    return tf.debugging.assert_less_equal(
        header_pixels(contents),
        tf.constant(max_pixels, tf.int64),
        message=f"image refused before decoding: its header announces more than the {max_pixels} pixel limit "
        "(a decompression bomb?); send a smaller image",
    )
