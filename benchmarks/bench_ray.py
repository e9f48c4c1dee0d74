"""The Ray engine against the local engine: whole bottlenecks stage processes. Issues #21 and #25.

Two throwaway projects (tests/project.py's `make_project`, shipped defaults, efficientnet_lite0,
no augmented views) on the first 1,200 and the first 2,400 of the shared photos (a prefix that
stays balanced over the classes). Each round runs the real stage, `python stages/bottlenecks.py`,
once per (size, engine) from a cold feature cache (the converted backbone kept), the order turned
every round, and times the whole process from spawn to exit: Ray's start, its actor pool, the
compute, the split arrays, MLflow logging and Ray's shutdown are all inside it.

From the two sizes, per engine and round: the steady state (the extra images over the extra
time, 1,200 / (t2400 - t1200) img/s) and the fixed cost (t1200 - 1,200 / steady state). Targets,
on the median over rounds of the per-round figures: Ray's steady state ≥ 0.85x local's, Ray's
fixed cost ≤ local's + 10 s, and every array Ray writes identical to local's (same bytes).

    .venv/bin/python benchmarks/bench_ray.py [--data flower_photos.tgz] [--sizes 1200 2400] [--rounds 3]

Also part E of benchmarks/run.py (`figures`, `rows`). Writes benchmarks/results/ray.json.
"""

import argparse
import hashlib
import importlib.util
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

from bench_pipeline import bench_cache, image_folder, image_paths  # noqa: E402

REAL_DATA = HERE.parent.parent / "shared" / "data" / "flower_photos.tgz"
REAL_SHA256 = "4be59c3be3b569acb97a1582218d287ad55ac5f7556126346a7802dd42fed075"
STEADY_TARGET = 0.85  # Ray's steady state ÷ local's
FIXED_MARGIN_S = 10.0  # Ray's fixed cost ≤ local's + this
ENGINES = ("local", "ray")
ARRAYS = ("train.npz", "validation.npz", "test.npz")


def available() -> bool:
    return importlib.util.find_spec("ray") is not None


def prefix_folder(images: Path, n: int, dest: Path) -> Path:
    """dest/<images' name>/<class>/… holding the first n photos (hard links where possible)."""
    root = dest / images.name
    for path in image_paths(images)[:n]:
        (root / path.parent.name).mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, root / path.parent.name / path.name)
        except OSError:
            shutil.copy(path, root / path.parent.name / path.name)
    return root


def project_of(folder: Path, root: Path) -> Path:
    """A project on folder, the shipped defaults, photos only, split done: ready for the stage."""
    from default_params import write_params
    from project import make_project, run

    root.mkdir(parents=True)
    make_project(root, str(folder), None, "efficientnet_lite0")
    small = sum(1 for _ in image_paths(folder)) < 500  # the harness test's few generated images
    # Bigger test and validation shares for a few images only, so no split is empty (split refuses
    # that); the stage computes every photo whatever its split.
    shares = {"data.testing_percentage": 25, "data.validation_percentage": 20} if small else {}
    write_params(
        root,
        **{"data.url": str(folder), "data.sha256": None, "backbone.name": "efficientnet_lite0", "augment.copies": 0},
        **shares,
    )
    run(root, "dvc", "repro", "split")
    return root


def stage_run(root: Path, engine: str) -> dict:
    """One cold-cache `python stages/bottlenecks.py` with `engine`: wall, peak RSS, the arrays'
    digest and the stage's own stats."""
    import measure
    from project import set_params

    set_params(root, **{"bottlenecks.engine": engine})
    cache = Path(os.environ["RETRAIN_CACHE_DIR"])
    shutil.rmtree(cache / "features", ignore_errors=True)  # cold features; backbones/ (the conversion) stays
    env = {**os.environ, "PYTHONPATH": str(root), "TQDM_DISABLE": "1"}
    env.pop("RAY_ADDRESS", None)  # a Ray of its own, started (and stopped) by the stage
    done = measure.whole_process([sys.executable, "stages/bottlenecks.py"], root, env)
    if done["returncode"]:
        raise SystemExit(f"bottlenecks ({engine}) failed in {root}:\n{done['output'][-3000:]}")
    digest = hashlib.sha256()
    for name in ARRAYS:
        digest.update((root / "data/features" / name).read_bytes())
    stats = json.loads((root / "data/bottlenecks.json").read_text())
    return {
        "wall_s": done["wall_s"],
        "peak_rss_mb": done["peak_rss_mb"],
        "arrays_sha256": digest.hexdigest(),
        "computed": stats["computed"],
        "compute_s": stats["seconds"],
        "ray_start_s": stats.get("ray_start_seconds"),
    }


def figures(images: Path, work: Path, sizes=(1200, 2400), rounds: int = 3) -> dict:
    """Every (size, engine) stage run in interleaved rounds; steady state and fixed cost per engine."""
    small, large = sizes
    projects = {n: project_of(prefix_folder(images, n, work / f"photos-{n}"), work / f"project-{n}") for n in sizes}
    counts = {n: sum(1 for _ in image_paths(work / f"photos-{n}" / images.name)) for n in sizes}
    runs = {f"{engine}_{n}": [] for n in sizes for engine in ENGINES}
    plan = [(n, engine) for n in sizes for engine in ENGINES]
    for r in range(rounds):
        for n, engine in plan if r % 2 == 0 else list(reversed(plan)):
            one = stage_run(projects[n], engine)
            one["load"] = round(os.getloadavg()[0], 2)
            runs[f"{engine}_{n}"].append(one)
            print(
                f"E: round {r + 1}/{rounds} {engine:<5} {n:>5} photos: {one['wall_s']:6.2f} s whole stage "
                f"({one['computed']} computed in {one['compute_s']} s; load {one['load']})",
                flush=True,
            )
    extra = counts[large] - counts[small]
    per_round = []
    for r in range(rounds):
        figure = {}
        for engine in ENGINES:
            t_small, t_large = runs[f"{engine}_{small}"][r]["wall_s"], runs[f"{engine}_{large}"][r]["wall_s"]
            steady = extra / (t_large - t_small) if t_large > t_small else float("inf")
            figure[engine] = {"steady_images_per_s": steady, "fixed_s": t_small - counts[small] / steady}
        figure["steady_ratio"] = figure["ray"]["steady_images_per_s"] / figure["local"]["steady_images_per_s"]
        figure["fixed_difference_s"] = figure["ray"]["fixed_s"] - figure["local"]["fixed_s"]
        per_round.append(figure)
    digests = {
        n: {engine: {one["arrays_sha256"] for one in runs[f"{engine}_{n}"]} for engine in ENGINES} for n in sizes
    }

    def median(values):
        return round(statistics.median(values), 3)

    return {
        "sizes": [small, large],
        "images": [counts[small], counts[large]],
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "runs": runs,
        "median_wall_s": {key: median(one["wall_s"] for one in v) for key, v in runs.items()},
        "steady_images_per_s": {e: median(f[e]["steady_images_per_s"] for f in per_round) for e in ENGINES},
        "fixed_s": {e: median(f[e]["fixed_s"] for f in per_round) for e in ENGINES},
        "steady_ratio": median(f["steady_ratio"] for f in per_round),
        "steady_ratio_rounds": [round(f["steady_ratio"], 3) for f in per_round],
        "fixed_difference_s": median(f["fixed_difference_s"] for f in per_round),
        "fixed_difference_rounds_s": [round(f["fixed_difference_s"], 2) for f in per_round],
        "arrays_identical": all(len(d["local"] | d["ray"]) == 1 for d in digests.values()),
        "local_over_ray_whole_stage": {
            str(n): median(runs[f"local_{n}"][r]["wall_s"] / runs[f"ray_{n}"][r]["wall_s"] for r in range(rounds))
            for n in sizes
        },
    }


def rows(ray: dict) -> list[dict]:
    """Table rows in benchmarks/run.py's form (figure, value, target, pass)."""
    small, large = ray["sizes"]
    wall = ray["median_wall_s"]
    steady, fixed = ray["steady_images_per_s"], ray["fixed_s"]
    common = (
        f"whole stage, cold cache, median of {ray['rounds']}: local {wall[f'local_{small}']} / "
        f"{wall[f'local_{large}']} s, ray {wall[f'ray_{small}']} / {wall[f'ray_{large}']} s "
        f"on {small} / {large} photos"
    )
    return [
        {
            "figure": "Ray ÷ local bottlenecks: steady state (extra photos over extra time)",
            "value": f"{ray['steady_ratio']} x: {steady['ray']:.1f} vs {steady['local']:.1f} img/s, rounds "
            f"{ray['steady_ratio_rounds']}; {common}",
            "target": f"≥ {STEADY_TARGET}x",
            "pass": ray["steady_ratio"] >= STEADY_TARGET,
        },
        {
            "figure": "Ray's fixed cost − local's",
            "value": f"{ray['fixed_difference_s']:+.1f} s: {fixed['ray']:.1f} vs {fixed['local']:.1f} s, rounds "
            f"{ray['fixed_difference_rounds_s']}",
            "target": f"≤ +{FIXED_MARGIN_S:g} s",
            "pass": ray["fixed_difference_s"] <= FIXED_MARGIN_S,
        },
        {
            "figure": "Ray's arrays ÷ local's",
            "value": "identical bytes" if ray["arrays_identical"] else "DIFFERENT",
            "target": "identical",
            "pass": ray["arrays_identical"],
        },
    ]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REAL_DATA, help="flower_photos.tgz or a folder of class folders")
    parser.add_argument("--sizes", type=int, nargs=2, default=(1200, 2400), help="the two job sizes (photos)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median of per-round figures)")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="folder for ray.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    started = time.time()
    try:
        bench_cache(work / "cache")  # cold features, the converted backbone reused
        images, source = image_folder(args.data, REAL_SHA256, work / "photos", max(args.sizes))
        load = os.getloadavg()[0]
        result = {"source": source, "load_average_at_start": round(load, 2)}
        result.update(figures(images, work, tuple(args.sizes), args.rounds))
        result["load_average_at_end"] = round(os.getloadavg()[0], 2)
        result["total_s"] = round(time.time() - started, 1)
        table = rows(result)
        result["table"] = table
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
        for row in table:
            verdict = "PASS" if row["pass"] else "FAIL"
            print(f"| {row['figure']} | {row['value']} | {row['target']} | {verdict} |")
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "ray.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0 if all(row["pass"] for row in table) else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
