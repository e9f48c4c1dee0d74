"""Which runtime, and which split of the cores, for feature extraction? Issue #17, measured.

On the real photos (or any folder of class folders), in interleaved rounds:
  1. the backbone alone on in-memory tensors: TensorFlow's SavedModel (batch 32) against the
     .tflite conversion on XNNPACK through `tf.lite.Interpreter` and through `ai-edge-litert`,
     1 and 2 threads, one image per invoke;
  2. the bottlenecks compute path (`compute_features`, cold cache) with XNNPACK threads x
     parallel decodes x batches prefetched: the split of the cores between decoding and the model;
  3. the largest feature difference XNNPACK vs TensorFlow over `--check` photos.
Every figure is the median img/s over rounds, with the rounds beside it. Writes
benchmarks/results/runtime.json.

    .venv/bin/python benchmarks/bench_runtime.py [--data flower_photos.tgz] [--images 320] [--rounds 3] [--check 2400]
"""

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tests")]

import numpy as np  # noqa: E402

from bench_pipeline import image_folder, image_paths  # noqa: E402
from run import REAL_DATA, REAL_SHA256  # noqa: E402  (benchmarks/run.py)

SPLITS = [(threads, decodes, prefetch) for threads, decodes, prefetch in itertools.product((1, 2), (1, 2), (2, 4))]


def model_alone(backbone, n: int) -> dict:
    """name → a function that runs n in-memory images through one runtime."""
    import tensorflow as tf

    from retrain.backbones import xnnpack

    x = np.random.default_rng(0).random((n, *backbone.image_size, 3), np.float32)
    batches = [tf.constant(x[i : i + 32]) for i in range(0, n, 32)]
    methods = {"tensorflow SavedModel, batch 32": lambda: [backbone.features(b).numpy() for b in batches]}
    for name, make in (("tf.lite.Interpreter", tf.lite.Interpreter), ("ai-edge-litert", xnnpack.interpreter_class())):
        for threads in (1, 2):
            interpreter = make(model_path=str(backbone._tflite), num_threads=threads)
            interpreter.allocate_tensors()
            given, taken = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]

            def run(interpreter=interpreter, given=given, taken=taken):
                for i in range(n):
                    interpreter.set_tensor(given, x[i : i + 1])
                    interpreter.invoke()
                    interpreter.get_tensor(taken)

            methods[f"{name}, XNNPACK, {threads} threads"] = run
    for fn in methods.values():
        fn()  # warm-up: tracing, XNNPACK weight packing
    return methods


def compute_paths(backbone, examples, work: Path) -> dict:
    """name → a function that runs the cold compute path with one split of the cores."""
    from retrain import features
    from retrain.backbones import xnnpack
    from retrain.features import FeatureCache, compute_features

    def make(threads, decodes, prefetch):
        def run():
            features.DECODE_THREADS, features.PREFETCH_BATCHES = decodes, prefetch
            backbone._extractor = xnnpack.Extractor(backbone._tflite, threads=threads)
            cache = FeatureCache(work / f"cache-{time.perf_counter_ns()}", backbone.id, backbone.feature_dim)
            compute_features(examples, backbone, cache, 32)

        return run

    return {f"compute path: {t} XNNPACK threads, {d} decodes, prefetch {p}": make(t, d, p) for t, d, p in SPLITS}


def rounds_of(methods: dict, n: int, rounds: int) -> dict:
    rates = {name: [] for name in methods}
    for r in range(rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            rates[name].append(round(n / (time.perf_counter() - start), 1))
            print(f"round {r + 1}/{rounds} {name:<62} {rates[name][-1]:7.1f} img/s", flush=True)
    return {name: {"median": statistics.median(v), "rounds": v} for name, v in rates.items()}


def max_difference(tf_backbone, xnnpack_backbone, files) -> float:
    from retrain.features import image_batches

    worst = 0.0
    for (images,) in image_batches([str(p) for p in files], tf_backbone.image_size, 32):
        ours, theirs = xnnpack_backbone.extract(images), tf_backbone.features(images).numpy()
        worst = max(worst, float(np.max(np.abs(ours - theirs))))
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REAL_DATA, help="flower_photos.tgz or a folder of class folders")
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--check", type=int, default=2400, help="photos for the feature difference")
    parser.add_argument("--work", type=Path, default=Path("/tmp/retrain-bench-runtime"))
    args = parser.parse_args()

    from retrain.backbones import load_backbone
    from retrain.download import file_sha256
    from retrain.features import Example

    folder, source = image_folder(args.data, REAL_SHA256, args.work / "images", None)
    print(f"images: {source}", flush=True)
    files = image_paths(folder)
    on_tf, on_xnnpack = load_backbone("efficientnet_lite0"), load_backbone("efficientnet_lite0", runtime="xnnpack")
    examples = [Example(str(p), p.parent.name, "train", file_sha256(p)) for p in files[: args.images]]
    result = {
        "images": len(examples),
        "rounds": args.rounds,
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
    }
    result["model_alone"] = rounds_of(model_alone(on_xnnpack, args.images), args.images, args.rounds)
    try:
        result["compute_path"] = rounds_of(compute_paths(on_xnnpack, examples, args.work), len(examples), args.rounds)
        result["max_abs_feature_difference"] = max_difference(on_tf, on_xnnpack, files[: args.check])
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    result["checked_photos"] = len(files[: args.check])
    result["load_average_at_end"] = os.getloadavg()[0]
    print()
    print("| method | median img/s | rounds |\n|---|---|---|")
    for part in ("model_alone", "compute_path"):
        for name, v in result[part].items():
            print(f"| {name} | {v['median']} | {' / '.join(map(str, v['rounds']))} |")
    print(
        f"\nmax |XNNPACK - TensorFlow| over {result['checked_photos']} photos: {result['max_abs_feature_difference']:.2e}"
    )
    out = HERE / "results" / "runtime.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
