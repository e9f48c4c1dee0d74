"""How fast is retrain on this machine? Every figure of issue #7 in one run, side by side.

Real photos: ../shared/data/flower_photos.tgz (2,400 JPEGs), extracted to a temporary folder;
without it (a user's clone) generated JPEGs stand in, and the table says so. Targets are ratios of
figures measured in this same run, so a machine shared with other work still compares like with like.

  A. In process, on one subset, in interleaved rounds (ratios within a round, median over rounds):
     the backbone alone on in-memory tensors at its best batch size, decode+resize alone, the
     bottlenecks compute path (`compute_features`, cold cache), a retrain.py-style loop and the
     Keras tutorial way.
  B. A temporary git + DVC project (tests/test_pipeline.py's `make_project`) on the whole set with
     efficientnet_lite0: cold bottlenecks stage (images/s, peak RSS; part A's ceiling measured
     again just before and after it), train, a no-op `dvc repro`, 10 new images, the same set 4x
     (copies with distinct bytes) for memory growth.
  C. The exported model: SavedModel and TFLite throughput, cold `retrain predict one.jpg`.
     Start-up of each stage process (imports + model load) and a cold `retrain predict one.jpg`
     (whole process, wall and peak RSS), each beside a bare `python -c "import tensorflow"` in
     interleaved rounds (issue #25: ≤ 0.25x where no TensorFlow is needed).
  D. The head: its fit beside Keras fit and the 20-trial search (bench_head.py); a queued sweep of
     head-only experiments, wall per experiment (bench_sweep.py), and the same sweep of
     `--sweep-before` (a `git archive` of that commit, default ac20c9a, the code before issue #25)
     in the same sitting.
  E. The Ray engine against the local one, whole bottlenecks stage processes on 1,200 and 2,400
     photos (bench_ray.py): steady state, fixed cost, identical arrays. Skipped without ray.

Prints a table with a PASS/FAIL column and writes benchmarks/results/run-<time>.json (and latest.json).

    .venv/bin/python benchmarks/run.py [--images 400] [--quick] [--rounds 5] [--compare-images 320]
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tests")]

import bench_head  # noqa: E402  (benchmarks/bench_head.py)
import bench_pipeline  # noqa: E402  (part B)
import bench_ray  # noqa: E402  (part E)
import bench_sweep  # noqa: E402  (benchmarks/bench_sweep.py)
import measure  # noqa: E402  (benchmarks/measure.py)

REAL_DATA = HERE.parent.parent / "shared" / "data" / "flower_photos.tgz"
REAL_SHA256 = "4be59c3be3b569acb97a1582218d287ad55ac5f7556126346a7802dd42fed075"
RESULTS = HERE / "results"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="use only this many images (default: all)")
    parser.add_argument("--compare-images", type=int, default=320, help="subset for the side-by-side part A")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds in part A (median of paired ratios)")
    parser.add_argument(
        "--sweep-experiments",
        type=int,
        default=4,
        help="queued head-only experiments to time (bench_sweep.py); 0 skips them",
    )
    parser.add_argument(
        "--sweep-before",
        default="ac20c9a",
        help="commit whose queued sweep runs beside this code's (git archive of it); 'none' skips it",
    )
    parser.add_argument("--ray-rounds", type=int, default=3, help="interleaved rounds of part E; 0 skips it")
    parser.add_argument("--quick", action="store_true", help="a small run: 200 images, 64 compared, 1 round, no sweep")
    parser.add_argument("--data", type=Path, default=REAL_DATA, help="flower_photos.tgz or a folder of class folders")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="folder for the JSON (default benchmarks/results)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.compare_images, args.rounds = args.images or 200, min(args.compare_images, 64), 1
        args.sweep_experiments, args.ray_rounds = 0, min(args.ray_rounds, 1)
    return args


def machine() -> dict:
    model = (
        next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
            platform.processor(),
        )
        if os.path.exists("/proc/cpuinfo")
        else platform.processor()
    )
    import tensorflow as tf

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="retrain-bench-"))
    started = time.time()
    try:
        images, source = bench_pipeline.image_folder(args.data, REAL_SHA256, work / "images", args.images)
        print(f"images: {source}; work folder {work}", flush=True)
        result = {"machine": machine(), "data": source, "command": " ".join(["benchmarks/run.py", *sys.argv[1:]])}
        cache = bench_pipeline.bench_cache(work / "cache")  # fresh feature cache, converted backbone reused
        result["compare"] = measure.side_by_side(images, args.compare_images, args.rounds, work / "compare")
        ceiling_now = result["compare"].pop("_ceiling_now")
        result["pipeline"] = bench_pipeline.pipeline_figures(images, work, cache, ceiling_now)
        root = result["pipeline"].pop("_project")
        one_photo = bench_pipeline.image_paths(images)[0]
        result["startup"] = measure.startup_figures(root, max(3, args.rounds), one_photo)
        result["predict"] = measure.predict_figures(root, images, args.compare_images)
        # The head on this project's features: its fit beside Keras fit, and the 20-trial search
        # (3 trials in a small run: --quick or --images).
        result["head"] = bench_head.figures(
            root / "data" / "features", args.rounds, trials=3 if args.quick or args.images else 20
        )
        if args.sweep_experiments:  # a queued sweep in a project of its own, on the same photos
            before = None
            if args.sweep_before.lower() != "none":  # the earlier commit first, with its own cache
                code = bench_sweep.checkout(args.sweep_before, work / "before-code")
                (work / "sweep-before").mkdir()
                before = bench_sweep.sweep(
                    code, images, args.sweep_experiments, work / "sweep-before", cache=work / "sweep-before/cache"
                )
                before.pop("status")
                before["rev"] = args.sweep_before
            (work / "sweep").mkdir()
            result["sweep"] = bench_sweep.sweep(
                HERE.parent, images, args.sweep_experiments, work / "sweep", cache=cache
            )
            result["sweep"].pop("status")
            if before is not None:
                result["sweep"]["before"] = before
        if args.ray_rounds and bench_ray.available():  # part E: whole stage processes, two job sizes
            os.environ["RETRAIN_CACHE_DIR"] = str(cache)
            n = len(bench_pipeline.image_paths(images))
            sizes = (min(1200, n // 2), min(2400, n))
            result["ray"] = bench_ray.figures(images, work / "ray", sizes, args.ray_rounds)
        result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        result["total_s"] = round(time.time() - started, 1)
        result["table"] = measure.table(result)
        print()
        print(measure.render(result["table"], result))
        args.results.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in (f"run-{stamp}.json", "latest.json"):
            (args.results / name).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.results / f'run-{stamp}.json'}")
        return 0 if all(row["pass"] is not False for row in result["table"]) else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
