"""How fast is the embedded backbone? Features per second by batch size, and first-use cost.

Measures efficientnet_lite0 on in-memory 224x224 batches (batch 1, 32, 64, 128), `features`
called through a tf.function as the bottlenecks and export stages call it, after a warm-up; and
the one-time conversion from PyTorch weights into a fresh cache folder. Prints a table and writes
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
        load_backbone("efficientnet_lite0")
        converted = time.perf_counter() - start
        start = time.perf_counter()
        backbone = load_backbone("efficientnet_lite0")
        cached = time.perf_counter() - start
    return converted, cached, backbone


def images_per_second(fn, batch, seconds):
    images = tf.constant(np.random.default_rng(0).random((batch, 224, 224, 3), np.float32))
    for _ in range(2):  # warm-up: tracing, XLA compilation, oneDNN primitive caches
        fn(images).numpy()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        fn(images).numpy()
        count += 1
    return count * batch / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--xla", action="store_true", help="also measure jit_compile=True")
    args = parser.parse_args()

    converted, cached, backbone = first_use()
    rows = []
    for jit in (False, True) if args.xla else (False,):
        fn = tf.function(lambda x: backbone.features(x), jit_compile=jit)
        for batch in BATCH_SIZES:
            rate = images_per_second(fn, batch, args.seconds)
            rows.append({"batch": batch, "xla": jit, "images_per_s": round(rate, 1)})

    load = os.getloadavg()[0]
    print(f"efficientnet_lite0 on {os.cpu_count()} CPU cores (load {load:.1f}), "
          f"TensorFlow {tf.__version__}")
    print(f"first use (convert + load): {converted:.2f} s   cached load: {cached:.2f} s")
    print(f"{'batch':>5}  {'xla':>5}  {'images/s':>9}")
    for r in rows:
        print(f"{r['batch']:>5}  {str(r['xla']):>5}  {r['images_per_s']:>9.1f}")

    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump({
            "backbone": "efficientnet_lite0",
            "image_size": list(backbone.image_size),
            "tensorflow": tf.__version__,
            "cpu_count": os.cpu_count(),
            "load_average_1min": round(load, 2),
            "machine": platform.machine(),
            "first_use_convert_s": round(converted, 3),
            "cached_load_s": round(cached, 3),
            "features_per_s": rows,
        }, f, indent=2)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
