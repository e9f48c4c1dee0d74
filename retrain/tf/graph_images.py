"""The decoder of `retrain.images`, as TensorFlow ops: the exported SavedModel's serving graph.

A TF Serving client sends encoded bytes; the graph must turn them into the very pixels `retrain
predict` and the bottlenecks stage get from `retrain.images` (Pillow + numpy): JPEGs decoded with
libjpeg's accurate integer DCT (Pillow's; TensorFlow's default fast DCT differs by up to 21 levels),
other formats by `tf.io.decode_image`, EXIF orientation applied, then `tf.image.resize` bilinear,
which `retrain.images.resize_image` computes in numpy. tests/test_images.py checks they agree.
"""

import tensorflow as tf

# Exif's APP1 segment comes right after SOI, or after a JFIF APP0: its marker sits within the first
# few hundred bytes. The segment itself is at most 64 KiB, so IFD0 lies within that many bytes.
_EXIF_MARKER_WINDOW = 4096
_EXIF_SEGMENT_BYTES = 65536 + _EXIF_MARKER_WINDOW
_MAX_IFD_ENTRIES = 64  # IFD0 is sorted by tag and Orientation (0x0112) comes early


def decode_image(contents):
    """Decode encoded image bytes (JPEG, PNG, GIF first frame, BMP, WebP) to upright RGB.

    contents: scalar tf.string Tensor. Returns a uint8 Tensor of shape [H, W, 3]: grayscale is
    replicated, alpha dropped, CMYK converted, 16-bit scaled to 8, and a JPEG is rotated/flipped
    by its EXIF Orientation tag. Raises tf.errors.InvalidArgumentError on bytes that are no
    decodable image.
    """
    is_jpeg = tf.strings.substr(contents, 0, 2) == b"\xff\xd8"
    image = tf.cond(
        is_jpeg,
        lambda: tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False),
    )
    orientation = exif_orientation(contents)
    image = tf.cond(orientation == 1, lambda: image, lambda: _apply_orientation(image, orientation))
    image.set_shape([None, None, 3])
    return image


def resize_image(image, size):
    """uint8 [H, W, 3] → float32 [size[0], size[1], 3] in [0, 1], bilinear."""
    image = tf.image.convert_image_dtype(image, tf.float32)
    return tf.image.resize(image, size, method="bilinear")


def exif_orientation(contents):
    """EXIF Orientation (1..8) of JPEG bytes as an int32 scalar; 1 when absent or unreadable.

    Reads IFD0 of the first APP1 "Exif" segment with tensor ops (no Python), little or big endian.
    Most photos carry no Exif segment (none of 400 flower photos sampled), so a cheap look for its
    marker comes first; the full read cost about a quarter of decode+resize's CPU.
    """
    head = _padded_bytes(contents, _EXIF_MARKER_WINDOW + 10)
    window = tf.minimum(tf.shape(head)[0] - 16, _EXIF_MARKER_WINDOW)
    # An APP1 marker (FF E1), a 2-byte length, then "Exif\0\0".
    found = tf.ones([window], tf.bool)
    for k, byte in enumerate([0xFF, 0xE1, None, None, 0x45, 0x78, 0x69, 0x66, 0x00, 0x00]):
        if byte is not None:
            found &= head[k : k + window] == byte
    is_jpeg = (head[0] == 0xFF) & (head[1] == 0xD8)
    marker = tf.argmax(tf.cast(tf.concat([found, [False]], 0), tf.int32), output_type=tf.int32)
    return tf.cond(is_jpeg & tf.reduce_any(found), lambda: _read_orientation(contents, marker), lambda: tf.constant(1))


def _padded_bytes(contents, length):
    """The first `length` bytes of contents as uint8, followed by 16 zeros (reads past the end see zeros)."""
    return tf.concat([tf.io.decode_raw(tf.strings.substr(contents, 0, length), tf.uint8), tf.zeros([16], tf.uint8)], 0)


def _read_orientation(contents, marker):
    """Orientation from IFD0 of the Exif segment whose APP1 marker sits at byte `marker`."""
    head = _padded_bytes(contents, _EXIF_SEGMENT_BYTES)
    size = tf.shape(head)[0] - 16
    tiff = marker + 10  # TIFF header: byte order, 42, offset of IFD0

    def byte_at(offset):
        return tf.cast(tf.gather(head, tf.clip_by_value(offset, 0, size + 15)), tf.int32)

    little = byte_at(tiff) == 0x49  # "II" (Intel); else "MM" (Motorola)

    def u16(offset):
        first, second = byte_at(offset), byte_at(offset + 1)
        return tf.where(little, first + 256 * second, 256 * first + second)

    def u32_small(offset):  # offsets inside a 64 KiB segment: the high half is zero
        return tf.where(little, u16(offset), u16(offset + 2))

    ifd0 = tiff + u32_small(tiff + 4)
    entries = ifd0 + 2 + 12 * tf.range(_MAX_IFD_ENTRIES)
    is_orientation = (u16(entries) == 0x0112) & (tf.range(_MAX_IFD_ENTRIES) < u16(ifd0))
    value = tf.reduce_max(tf.where(is_orientation, u16(entries + 8), 0))
    return tf.where((value >= 1) & (value <= 8), value, 1)


# EXIF orientation 1..8 as "transpose first (5-8)", then flip rows and/or columns: the same pixels
# as PIL's ImageOps.exif_transpose. Two always-run ops on dynamic arguments instead of a
# tf.switch_case over 8 branch functions: decode+resize fell from 2.41-2.52 to 2.14-2.35 ms of CPU
# per flower photo.
_FLIPS = [[False, False, False], [False, True, False], [True, True, False], [True, False, False]]


def _apply_orientation(image, orientation):
    """Turn [H, W, 3] upright for EXIF orientation 1..8 (as PIL's ImageOps.exif_transpose).

    1 upright, 2 mirrored, 3 upside down, 4 mirrored upside down; 5-8 are 1-4 of the transposed
    image (5 transpose, 6 turned 90° clockwise, 7 transverse, 8 turned 90° anticlockwise).
    """
    index = orientation - 1
    perm = tf.where(index >= 4, tf.constant([1, 0, 2]), tf.constant([0, 1, 2]))
    flips = tf.gather(tf.constant(_FLIPS), index % 4)
    return tf.raw_ops.Reverse(tensor=tf.transpose(image, perm), dims=flips)
