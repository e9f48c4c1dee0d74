"""What a queued head-only experiment costs: wall per experiment and where it goes.

Builds a throwaway git + DVC project from a copy of the pipeline code (this repo's, or `--code`
another checkout such as `git worktree add /tmp/old <commit>` for a before/after pair) on the
shared flower photos, runs the baseline `dvc repro`, commits it, then queues `--experiments`
head-only experiments (`-S train.dropout=…`) and runs them with `dvc queue start -j 1`. Reports
the queue's wall time per experiment, the head's fit time (MLflow tag `train.seconds`, or the
old `train_seconds` metric), and per stage process the seconds from process start to the end of
its logging (tags `<stage>.process_seconds`; absent for old code).

    .venv/bin/python benchmarks/bench_sweep.py [--code DIR] [--experiments 4] [--images N]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REAL_DATA = HERE.parent.parent / "shared" / "data" / "flower_photos.tgz"
BIN = Path(sys.executable).parent
DROPOUTS = ("0.3", "0.35", "0.4", "0.45", "0.55", "0.6", "0.65", "0.7")


def sh(cwd: Path, *command: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = str(cwd)  # the project's copy of retrain/, not the one the venv has installed
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def make_project(code: Path, root: Path, images: Path) -> None:
    for name in ("dvc.yaml", "params.yaml", ".gitignore", "exclusions.csv"):
        if (code / name).is_file():  # exclusions.csv is newer than some checkouts
            shutil.copy(code / name, root / name)
    for folder in ("stages", "retrain"):
        shutil.copytree(code / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    params = (root / "params.yaml").read_text().splitlines()
    params = [
        f"  url: {images}" if line.startswith("  url:") else "  sha256: null" if line.startswith("  sha256:") else line
        for line in params
    ]
    (root / "params.yaml").write_text("\n".join(params) + "\n")
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "init", "-q")
    for name in (".dvc/config", ".dvcignore"):  # the checkout's DVC settings (cache link type), as a clone has them
        if (code / name).is_file():
            shutil.copy(code / name, root / name)
    sh(root, "git", "add", "-A")
    sh(root, "git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "pipeline")


def checkout(rev: str, dest: Path) -> Path:
    """`git archive` of rev from this repo into dest (a read-only copy of that commit's files)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(HERE.parent), "archive", "--format=tar", rev], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def sweep(code: Path, images: Path, experiments: int, work: Path, cache: Path | None = None) -> dict:
    """One queued sweep of `code`'s pipeline in work/project; `cache`: its own RETRAIN_CACHE_DIR
    (another checkout keeps its features and conversions apart from this code's)."""
    previous = os.environ.get("RETRAIN_CACHE_DIR")
    if cache is not None:
        os.environ["RETRAIN_CACHE_DIR"] = str(cache)
    try:
        return _sweep(code, images, experiments, work)
    finally:
        if previous is None:
            os.environ.pop("RETRAIN_CACHE_DIR", None)
        else:
            os.environ["RETRAIN_CACHE_DIR"] = previous


def _sweep(code: Path, images: Path, experiments: int, work: Path) -> dict:
    root = work / "project"
    root.mkdir()
    make_project(code, root, images)
    started = time.perf_counter()
    sh(root, "dvc", "repro")
    baseline = time.perf_counter() - started
    sh(root, "git", "add", "-A")
    sh(root, "git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "baseline")
    sh(root, "dvc", "exp", "run", "--queue", "-S", f"train.dropout={','.join(DROPOUTS[:experiments])}")
    started = time.perf_counter()
    sh(root, "dvc", "queue", "start", "-j", "1")
    while "Queued" in (status := sh(root, "dvc", "queue", "status")) or "Running" in status:
        time.sleep(1)
    wall = time.perf_counter() - started
    sh(root, "dvc", "queue", "stop")
    return {
        "baseline_repro_s": round(baseline, 1),
        "queue_wall_s": round(wall, 1),
        "per_experiment_s": round(wall / experiments, 1),
        "status": status,
        **_runs(root),
    }


def _runs(root: Path) -> dict:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("retrain")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("dvc_experiment")]
    fits, stages = [], {}
    for r in runs:
        fit = r.data.tags.get("train.seconds") or r.data.metrics.get("train_seconds")
        if fit is not None:
            fits.append(float(fit))
        for key, value in r.data.tags.items():  # stages this experiment ran (and the log step), not copied ones
            stage = key.split(".")[0]
            if key.endswith(".process_seconds") and (stage == "log" or r.data.tags.get(f"retrain.ran.{stage}")):
                stages.setdefault(stage, []).append(float(value))
    return {
        "experiments_logged": len(runs),
        "fit_s_median": statistics.median(fits) if fits else None,
        "stage_process_s_median": {k: statistics.median(v) for k, v in stages.items()},
    }


TARGET_S = 45  # issue #16: per queued head-only experiment, this 2-core machine
BEFORE_RATIO = 0.6  # issue #25: this code's experiment ÷ the commit before the lean runtime (ac20c9a)


def rows(sweep_result: dict) -> list[dict]:
    """Table rows in benchmarks/run.py's form (figure, value, target, pass); with a `before` sweep
    (another commit, same photos, same sitting) also this code's per experiment ÷ that one's."""
    r = sweep_result

    def stages(r):
        return ", ".join(f"{k} {v:.1f}" for k, v in r["stage_process_s_median"].items())

    out = [
        {
            "figure": f"queued head-only experiment, {r['experiments_logged']} in a queue (bench_sweep.py)",
            "value": f"{r['per_experiment_s']} s each ({r['queue_wall_s']} s for the queue); head fit "
            f"{r['fit_s_median']} s; stage processes (median s): {stages(r)}",
            "target": f"≤ {TARGET_S} s",
            "pass": r["per_experiment_s"] <= TARGET_S,
        }
    ]
    if "before" in r:
        b = r["before"]
        ratio = r["per_experiment_s"] / b["per_experiment_s"]
        out.append(
            {
                "figure": f"queued head-only experiment ÷ {b['rev']}'s, same photos, same sitting",
                "value": f"{ratio:.2f} x: {r['per_experiment_s']} s vs {b['per_experiment_s']} s each "
                f"({b['rev']}: head fit {b['fit_s_median']} s; stage processes {stages(b)})",
                "target": f"≤ {BEFORE_RATIO}x",
                "pass": ratio <= BEFORE_RATIO,
            }
        )
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, default=HERE.parent, help="checkout whose pipeline to run")
    parser.add_argument("--experiments", type=int, default=4)
    parser.add_argument(
        "--images", type=Path, default=None, help="a folder of class folders (default: the shared flowers)"
    )
    parser.add_argument("--keep", type=Path, default=None, help="work in this (new) folder and keep it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as temp:
        work = Path(args.keep or temp)
        work.mkdir(parents=True, exist_ok=True)
        images = args.images
        if images is None:
            with tarfile.open(REAL_DATA) as archive:
                archive.extractall(work / "photos", filter="data")
            images = next((work / "photos").iterdir())
        os.environ.setdefault("RETRAIN_CACHE_DIR", str(work / "cache"))
        result = {"code": str(args.code), **sweep(args.code.resolve(), images, args.experiments, work)}
    print(json.dumps(result, indent=2))
    if args.keep:
        print(sh(work / "project", "dvc", "exp", "show", "--no-pager", "--md"))


if __name__ == "__main__":
    main()
