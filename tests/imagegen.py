"""Small real images and archives for tests: solid colours with a few shapes, written with PIL.

Shared by every test module that needs a dataset on disk. Everything is deterministic: the same
call writes the same bytes, so tests never depend on chance.
"""

import io
import random
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

from PIL import Image, ImageDraw

DEFAULT_CLASSES = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def make_image(color=(255, 0, 0), size=(64, 64), seed=0, mode="RGB") -> Image.Image:
    """A `size` (width, height) image of `color` with a few shapes whose places depend on `seed`."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, color)
    draw = ImageDraw.Draw(image)
    width, height = size
    for _ in range(3):
        x0, y0 = rng.randrange(max(1, width - 8)), rng.randrange(max(1, height - 8))
        box = [x0, y0, x0 + rng.randrange(4, max(5, width // 2)), y0 + rng.randrange(4, max(5, height // 2))]
        shade = tuple(min(255, c // 2 + rng.randrange(64)) for c in color)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=shade)
    return image if mode == "RGB" else image.convert(mode)


def image_bytes(fmt="JPEG", color=(255, 0, 0), size=(64, 64), seed=0, mode="RGB", **save_args) -> bytes:
    """Encoded bytes of `make_image(...)` in PIL format `fmt` (JPEG, PNG, GIF, BMP, WEBP, TIFF)."""
    buffer = io.BytesIO()
    make_image(color, size, seed, mode).save(buffer, fmt, **save_args)
    return buffer.getvalue()


def png_16bit_bytes(size=(32, 16), value=40000) -> bytes:
    """A 16-bit grayscale PNG of one `value` (0..65535)."""
    buffer = io.BytesIO()
    Image.new("I;16", size, value).save(buffer, "PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height, with no pixel data (nothing allocated)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def jpeg_with_orientation(orientation: int, size=(48, 32), seed=0, big_endian=False) -> bytes:
    """A JPEG whose EXIF Orientation tag is `orientation` (1..8); pixels stored as `size`."""
    if big_endian:  # "MM" TIFF header, IFD0 at 8 with one SHORT entry, no next IFD
        exif = b"Exif\0\0MM\0\x2a" + struct.pack(">IHHHIHHI", 8, 1, 0x0112, 3, 1, orientation, 0, 0)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        exif = exif.tobytes()
    return image_bytes("JPEG", (200, 50, 50), size, seed, exif=exif, quality=95)


def make_class_folders(root, classes=None, per_class=5, size=(64, 64)) -> dict[str, list[Path]]:
    """Write root/<class>/<class>_<i>.jpg JPEGs; return {class: [paths]}.

    classes: {name: (r, g, b)}, default red/green/blue. File names are distinct across classes.
    """
    root = Path(root)
    written = {}
    for index, (name, color) in enumerate((classes or DEFAULT_CLASSES).items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        written[name] = []
        for i in range(per_class):
            path = folder / f"{name}_{i:04d}.jpg"
            path.write_bytes(image_bytes("JPEG", color, size, seed=index * 100_003 + i))
            written[name].append(path)
    return written


def make_tgz(src_dir, tgz_path, arcname=None) -> Path:
    """Pack src_dir into a gzipped tar whose single top-level folder is `arcname` (default: its name)."""
    src_dir, tgz_path = Path(src_dir), Path(tgz_path)
    with tarfile.open(tgz_path, "w:gz") as tar:
        tar.add(src_dir, arcname=arcname or src_dir.name)
    return tgz_path


def make_zip(src_dir, zip_path, arcname=None) -> Path:
    """Pack src_dir into a zip whose single top-level folder is `arcname` (default: its name)."""
    src_dir, zip_path = Path(src_dir), Path(zip_path)
    top = arcname or src_dir.name
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted(src_dir.rglob("*")):
            zf.write(path, f"{top}/{path.relative_to(src_dir).as_posix()}")
    return zip_path


def split_examples(root, splits, size=(40, 40)):
    """split.csv rows (retrain.features.Example) for generated class folders under root.

    splits: the split of each class's i-th image, e.g. ["train", "train", "validation", "test"];
    one image per entry is written in every class.
    """
    from retrain.download import file_sha256
    from retrain.features import Example

    written = make_class_folders(root, per_class=len(splits), size=size)
    return [
        Example(str(path), label, splits[i], file_sha256(path))
        for label, files in written.items()
        for i, path in enumerate(files)
    ]
