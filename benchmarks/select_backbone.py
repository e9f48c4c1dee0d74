"""Which embedded backbone generalises? k-fold cross-validation of frozen heads on train+validation.

For each candidate (an EfficientNet-Lite variant at a size) the script computes every photo's
features once, through the library's content-addressed feature cache (`$RETRAIN_CACHE_DIR`), and
times that cold pass (img/s; a candidate already cached reuses the img/s of the run that filled
it). It then scores a head at params.yaml's `train` settings by stratified k-fold CV on the
pipeline's train+validation photos: each fold's head early-stops on a seeded 10% of its own
training folds, never on the fold it is scored on. Test accuracy (a head fitted on train,
early-stopped on validation, as the pipeline does) is reported beside it, never used to choose.
`--repeats R` repeats the k-fold split with R seeds (R*k heads per candidate); every candidate
gets the same folds, so the table also gives each one's fold-by-fold difference from the first.
`--knobs` re-scores head settings (label smoothing, hidden units, dropout) on one candidate.
`--speed N` instead measures cold bottlenecks img/s alone: N photos per candidate through a fresh
feature cache on the pipeline's runtime (XNNPACK), `--rounds` interleaved rounds, the median.

    .venv/bin/python benchmarks/select_backbone.py --data ../shared/data/flower_photos.tgz \\
        --work /tmp/h4/select [--folds 5] [--candidates efficientnet_lite0:224,efficientnet_lite0:256]

Prints a markdown table and writes benchmarks/results/select_backbone.json.
"""

import argparse
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from retrain.backbones import load_backbone  # noqa: E402
from retrain.backbones.efficientnet_lite import VARIANTS  # noqa: E402
from retrain.cache import cache_root  # noqa: E402
from retrain.features import FeatureCache, class_names, compute_features, read_split  # noqa: E402
from retrain.params import load_params  # noqa: E402
from retrain.split import split_dataset  # noqa: E402
from retrain.tf.efficientnet_lite import build, multiply_adds  # noqa: E402
from retrain.tf.head_training import train_head  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "select_backbone.json"
# Each variant at its native size and 32 px larger (Lite0 at 256 is the current default).
CANDIDATES = [
    f"{name}:{size}" for name, variant in VARIANTS.items() for size in (variant.native_size, variant.native_size + 32)
]
KNOBS = [{}, {"label_smoothing": 0.0}, {"hidden_units": 0}, {"dropout": 0.2}, {"dropout": 0.7}]


def prepare(archive: Path, work: Path) -> list:
    """Extract the archive and split it by the pipeline's rule; examples with absolute paths."""
    raw = work / "raw"
    if not raw.is_dir():
        with tarfile.open(archive) as tar:
            tar.extractall(work / ".raw-tmp", filter="data")
        (work / ".raw-tmp").rename(raw)
    roots = [p for p in raw.iterdir() if p.is_dir()]
    root = roots[0] if len(roots) == 1 else raw
    params = load_params(HERE.parent / "params.yaml").data
    split_csv = work / "split.csv"
    if not split_csv.exists():
        split_dataset(
            root,
            split_csv,
            work / "rejected.csv",
            base_dir=work,
            validation_percentage=params.validation_percentage,
            testing_percentage=params.testing_percentage,
            min_images_per_class=params.min_images_per_class,
        )
    return [e.__class__(str(work / e.path), e.label, e.split, e.sha256) for e in read_split(split_csv)]


def features_of(name: str, size: int, examples: list, batch_size: int, speeds: dict) -> np.ndarray:
    """float32 [N, D] features of every example (cached); records the cold img/s in `speeds`."""
    # TensorFlow's features: the pipeline's XNNPACK ones match them within 1e-4, and the cache
    # filled by earlier runs of this study stays valid (the runtime is part of the cache key).
    backbone = load_backbone(name, image_size=(size, size))
    cache = FeatureCache(cache_root() / "features", backbone.id, backbone.feature_dim)
    stats = compute_features(examples, backbone, cache, batch_size)
    key = f"{name}:{size}"
    if stats["computed"] == len({e.sha256 for e in examples}):  # a cold pass: its speed counts
        speeds[key] = stats["images_per_second"]
    return np.stack([cache.get(e.sha256) for e in examples])


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number [N] per example: each class dealt round-robin over k folds in a seeded order."""
    fold = np.empty(len(labels), np.int64)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold[members] = np.arange(len(members)) % k
    return fold


def fit_and_score(x, y, train, early, scored, num_classes, params, seed) -> float:
    head, _ = train_head((x[train], y[train]), (x[early], y[early]), num_classes, params, seed)
    predicted = head.predict(x[scored], batch_size=1024, verbose=0).argmax(axis=1)
    return float((predicted == y[scored]).mean())


def cross_validate(x, y, num_classes, params, folds: int, seed: int, repeats: int = 1) -> list[float]:
    """Held-out accuracy of each fold of each repeat; early stopping uses 10% of the other folds."""
    scores = []
    for r in range(repeats):
        fold = stratified_folds(y, folds, seed + 1000 * r)
        for k in range(folds):
            rest = np.flatnonzero(fold != k)
            inner = stratified_folds(y[rest], 10, seed + 1000 * r + 1 + k) == 0
            scores.append(
                fit_and_score(x, y, rest[~inner], rest[inner], np.flatnonzero(fold == k), num_classes, params, seed)
            )
    return scores


def evaluate(name, size, examples, args, speeds, params):
    """One table row for a candidate: CV mean and sd, test accuracy, cold img/s."""
    x = features_of(name, size, examples, args.batch_size, speeds)
    classes = class_names(examples)
    y = np.array([classes.index(e.label) for e in examples])
    split = np.array([e.split for e in examples])
    pool = np.flatnonzero(split != "test")
    started = time.perf_counter()
    cv = cross_validate(x[pool], y[pool], len(classes), params, args.folds, args.seed, args.repeats)
    test = fit_and_score(
        x,
        y,
        np.flatnonzero(split == "train"),
        np.flatnonzero(split == "validation"),
        np.flatnonzero(split == "test"),
        len(classes),
        params,
        args.seed,
    )
    return {
        "candidate": f"{name}:{size}",
        "cv_folds": cv,
        "cv_mean": float(np.mean(cv)),
        "cv_sd": float(np.std(cv, ddof=1)),
        "test": test,
        "img_per_s": speeds.get(f"{name}:{size}"),
        "head_seconds": round(time.perf_counter() - started, 1),
        "gmacs": round(multiply_adds(build(variant=name, image_size=(size, size)), (size, size)) / 1e9, 3),
    }


def print_table(rows, speeds=None):
    """Markdown: CV mean ± sd over folds, the paired difference from the first row, test, img/s."""
    speeds = speeds or {}
    print("| candidate | CV mean ± sd | Δ vs first, paired | test | cold img/s | GMACs |")
    print("|---|---|---|---|---|---|")
    first = np.array(rows[0]["cv_folds"])
    for r in rows:
        delta = np.array(r["cv_folds"]) - first if len(r["cv_folds"]) == len(first) else np.zeros(1)
        spread = np.std(delta, ddof=1) if len(delta) > 1 else 0.0
        speed = speeds.get(r["candidate"], {}).get("median") or r["img_per_s"]
        label = r["candidate"] + (f" {r['knobs']}" if r.get("knobs") else "")
        print(
            f"| {label} | {100 * r['cv_mean']:.2f} ± {100 * r['cv_sd']:.2f} | "
            f"{100 * delta.mean():+.2f} ± {100 * spread:.2f} | {100 * r['test']:.2f} | "
            f"{f'{speed:.1f}' if speed else '?'} | {r.get('gmacs', '?')} |",
            flush=True,
        )


def measure_speed(examples: list, candidates: list, n: int, rounds: int, batch_size: int) -> dict:
    """Cold bottlenecks img/s per candidate: n photos into an empty feature cache, on the
    pipeline's runtime, rounds interleaved over the candidates (the machine is shared and noisy)."""
    photos = [e for e in examples if e.split == "train"][:n]
    backbones = {
        c: load_backbone(c.split(":")[0], image_size=(int(c.split(":")[1]),) * 2, runtime="xnnpack") for c in candidates
    }
    runs = {c: [] for c in candidates}
    for _ in range(rounds):
        for candidate, backbone in backbones.items():
            with tempfile.TemporaryDirectory() as folder:
                cache = FeatureCache(Path(folder), backbone.id, backbone.feature_dim)
                runs[candidate].append(compute_features(photos, backbone, cache, batch_size)["images_per_second"])
            print(candidate, runs[candidate][-1], "img/s", flush=True)
    return {
        c: {"median": statistics.median(r), "rounds": r, "images": len(photos), "runtime": backbones[c].runtime}
        for c, r in runs.items()
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="flower_photos.tgz")
    parser.add_argument("--work", type=Path, required=True, help="folder for the photos and split.csv")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="name:size,...")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="k-fold splits with different seeds")
    parser.add_argument("--speed", type=int, help="measure cold img/s on this many photos instead")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --speed")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--knobs", help="name:size to re-score head settings on, instead of the candidates")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    examples = prepare(args.data, args.work)
    base = load_params(HERE.parent / "params.yaml").train
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    speeds = results.get("img_per_s", {})
    rows = []
    if args.speed:
        results["speed"] = measure_speed(examples, args.candidates.split(","), args.speed, args.rounds, args.batch_size)
        for candidate, r in results["speed"].items():
            print(f"{candidate}: median {r['median']:.1f} img/s, rounds {r['rounds']} ({r['runtime']})")
    elif args.knobs:
        name, size = args.knobs.split(":")
        for knob in KNOBS:
            row = evaluate(name, int(size), examples, args, speeds, base.model_copy(update=knob))
            rows.append({**row, "knobs": knob})
            print_table([rows[0], rows[-1]])
        results["knobs"] = rows
    else:
        for candidate in args.candidates.split(","):
            name, size = candidate.split(":")
            rows.append(evaluate(name, int(size), examples, args, speeds, base))
            print_table([rows[0], rows[-1]])
        results["candidates"] = rows
    results["img_per_s"] = speeds
    results["cpu_count"] = os.cpu_count()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    if rows:
        print()
        print_table(rows, results.get("speed"))
    print(f"\nwrote {args.results}")


if __name__ == "__main__":
    main()
