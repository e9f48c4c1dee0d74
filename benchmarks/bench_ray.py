"""The Ray engine against the local engine on the same photos, in the same run. Issue #21, measured.

Both engines run the bottlenecks compute path (`compute_features`) with efficientnet_lite0 on its
runtime (XNNPACK) over the same photos, each from a cold feature cache, in interleaved rounds
(local, ray, ray, local, ...). Ray is started once in this process, locally, with at most 2 CPUs
and a 200 MB object store (the engine's defaults on this machine); a Ray round includes starting
its actor pool (each actor imports TensorFlow and loads the backbone), as a stage run does.

Figures: images/s of each engine (median over rounds, rounds beside it), the ratio ray/local
(median of per-round ratios; target >= 0.85), Ray's start-up (`ray.init`) and the actor pool's
start (a one-image job), and the largest difference between the two engines' vectors (must be 0).
Writes benchmarks/results/ray.json.

    .venv/bin/python benchmarks/bench_ray.py [--data flower_photos.tgz] [--images 2400] [--rounds 3]
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tests")]

import numpy as np  # noqa: E402

from project import bench_cache, image_folder, image_paths  # noqa: E402  (benchmarks/project.py)

REAL_DATA = HERE.parent.parent / "shared" / "data" / "flower_photos.tgz"
REAL_SHA256 = "4be59c3be3b569acb97a1582218d287ad55ac5f7556126346a7802dd42fed075"
TARGET = 0.85


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REAL_DATA, help="flower_photos.tgz or a folder of class folders")
    parser.add_argument("--images", type=int, default=None, help="use only this many photos (default: all)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median of paired ratios)")
    parser.add_argument("--batch", type=int, default=32, help="bottlenecks.batch_size")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="folder for ray.json")
    return parser.parse_args(argv)


def examples_of(root: Path):
    """Example rows for every photo under root (split and label don't matter to the compute path)."""
    from retrain.download import file_sha256
    from retrain.features import Example

    return [Example(str(p), p.parent.name, "train", file_sha256(p)) for p in image_paths(root)]


def one_round(engine: str, examples, backbone, features_root: Path, batch: int) -> tuple[dict, dict]:
    """(stats, key → vector) of one cold-cache run of `engine`."""
    from retrain import features, ray_engine
    from retrain.features import FeatureCache

    shutil.rmtree(features_root, ignore_errors=True)
    cache = FeatureCache(features_root, backbone.id, backbone.feature_dim)
    compute = features.compute_features if engine == "local" else ray_engine.compute_features
    stats = compute(examples, backbone, cache, batch)
    return stats, {e.sha256: cache.get(e.sha256) for e in examples}


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        bench_cache(work / "cache")  # cold features, the converted backbone reused
        root, source = image_folder(args.data, REAL_SHA256, work / "photos", args.images)
        examples = examples_of(root)

        from retrain import ray_engine
        from retrain.backbones import load_backbone

        backbone = load_backbone("efficientnet_lite0", runtime="xnnpack")
        started = ray_engine.connect(None)  # RAY_ADDRESS unset: a local Ray, the engine's defaults
        pool_start, _ = one_round("ray", examples[:1], backbone, work / "cache/features", args.batch)
        samples, vectors = {"local": [], "ray": []}, {}
        for r in range(args.rounds):
            for engine in (("local", "ray") if r % 2 == 0 else ("ray", "local")):
                stats, vectors[engine] = one_round(engine, examples, backbone, work / "cache/features", args.batch)
                samples[engine].append(stats["computed"] / stats["seconds"])
                print(f"round {r + 1} {engine}: {samples[engine][-1]:.1f} img/s ({stats['seconds']:.1f} s)", flush=True)
        ratio = statistics.median(ray / local for ray, local in zip(samples["ray"], samples["local"]))
        difference = max(float(np.max(np.abs(vectors["ray"][k] - vectors["local"][k]))) for k in vectors["local"])
        result = {
            "source": source, "images": len(examples), "rounds": args.rounds, "cpus": os.cpu_count(),
            "local_images_per_second": round(statistics.median(samples["local"]), 2),
            "ray_images_per_second": round(statistics.median(samples["ray"]), 2),
            "rounds_local": [round(s, 2) for s in samples["local"]],
            "rounds_ray": [round(s, 2) for s in samples["ray"]],
            "ray_over_local": round(ratio, 3), "target": TARGET, "pass": ratio >= TARGET,
            "ray_init_seconds": started["ray_start_seconds"], "actor_pool_start_seconds": pool_start["seconds"],
            "max_abs_difference": difference, "load_average": os.getloadavg()[0],
        }
        print(json.dumps(result, indent=2))
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "ray.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0 if result["pass"] and difference == 0 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
