"""How fast is the embedded backbone? Features per second by batch size, and first-use cost.

Measures efficientnet_lite0 on in-memory batches at its size (batch 1, 32, 64, 128): `features`
called through a tf.function as fine-tuning and export call it, and `extract` on XNNPACK as the
bottlenecks stage calls it, after a warm-up; and the one-time conversions (PyTorch weights to a
SavedModel, then to .tflite) into a fresh cache folder. Prints a table and writes
benchmarks/results/backbone.json. `--xla` adds `jit_compile=True` runs: on a 2-core CPU they were
~10x slower (XLA's CPU depthwise convolutions), which is why the model does not use XLA.

    .venv/bin/python benchmarks/bench_backbone.py [--seconds 3] [--xla]
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from retrain.backbones import load_backbone  # noqa: E402

BATCH_SIZES = [1, 32, 64, 128]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "backbone.json")


def first_use():
    """Seconds to convert and load into an empty cache, then to load again from the cache."""
    with tempfile.TemporaryDirectory() as cache:
        os.environ["RETRAIN_CACHE_DIR"] = cache
        start = time.perf_counter()
        load_backbone("efficientnet_lite0", runtime="xnnpack")
        converted = time.perf_counter() - start
        start = time.perf_counter()
        backbone = load_backbone("efficientnet_lite0", runtime="xnnpack")
        cached = time.perf_counter() - start
        first = np.zeros((1, *backbone.image_size, 3), np.float32)
        backbone.features(first), backbone.extract(first)  # both runtimes opened before the folder goes
    return converted, cached, backbone


def images_per_second(fn, batch, seconds, size):
    images = tf.constant(np.random.default_rng(0).random((batch, *size, 3), np.float32))
    for _ in range(2):  # warm-up: tracing, XLA compilation, oneDNN primitive caches
        np.asarray(fn(images))
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        np.asarray(fn(images))
        count += 1
    return count * batch / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--xla", action="store_true", help="also measure jit_compile=True")
    args = parser.parse_args()

    converted, cached, backbone = first_use()
    rows = []
    runs = [("xnnpack", False, backbone.extract)]
    runs += [
        ("tensorflow", jit, tf.function(lambda x: backbone.features(x), jit_compile=jit))
        for jit in ((False, True) if args.xla else (False,))
    ]
    for runtime, jit, fn in runs:
        for batch in BATCH_SIZES:
            rate = images_per_second(fn, batch, args.seconds, backbone.image_size)
            rows.append({"runtime": runtime, "batch": batch, "xla": jit, "images_per_s": round(rate, 1)})

    load = os.getloadavg()[0]
    print(f"efficientnet_lite0 on {os.cpu_count()} CPU cores (load {load:.1f}), TensorFlow {tf.__version__}")
    print(f"first use (convert + load): {converted:.2f} s   cached load: {cached:.2f} s")
    print(f"{'runtime':>10}  {'batch':>5}  {'xla':>5}  {'images/s':>9}")
    for r in rows:
        print(f"{r['runtime']:>10}  {r['batch']:>5}  {str(r['xla']):>5}  {r['images_per_s']:>9.1f}")

    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(
            {
                "backbone": "efficientnet_lite0",
                "image_size": list(backbone.image_size),
                "tensorflow": tf.__version__,
                "cpu_count": os.cpu_count(),
                "load_average_1min": round(load, 2),
                "machine": platform.machine(),
                "first_use_convert_s": round(converted, 3),
                "cached_load_s": round(cached, 3),
                "features_per_s": rows,
            },
            f,
            indent=2,
        )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
