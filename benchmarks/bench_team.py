"""How much does the team server cost a pipeline run? SQLite in the clone versus PostgreSQL + proxied artifacts.

One throwaway project (tests/project.py's `make_project`, the tests' tiny backbone, generated
images, so tracking is a visible share of the time) runs `dvc repro --force --downstream train`
(train, finetune, evaluate, export: every stage that logs, each logging one MLflow run's params,
curves, dataset inputs, reports and model) in interleaved rounds against the default SQLite store
and against a real PostgreSQL + `mlflow server --serve-artifacts` on loopback (tests/team_servers.py).
Prints the median wall time per store and writes benchmarks/results/team.json.

    .venv/bin/python benchmarks/bench_team.py [--rounds 3] [--per-class 16]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from conftest import save_tiny_backbone  # noqa: E402
from imagegen import make_class_folders  # noqa: E402
from project import CLASSES, make_project, publish, ran_stages, run, set_params  # noqa: E402
from team_servers import mlflow_team_server, postgres  # noqa: E402

RESULTS = HERE / "results" / "team.json"


def timed_repro(root: Path, tracking_uri: str | None) -> float:
    start = time.perf_counter()
    result = run(root, "dvc", "repro", "--force", "--downstream", "train", tracking_uri=tracking_uri)
    seconds = time.perf_counter() - start
    assert "export" in ran_stages(result), result.stdout[-2000:]
    return seconds


def project(work: Path, per_class: int) -> Path:
    make_class_folders(work / "images/flowers", CLASSES, per_class=per_class, size=(64, 64))
    (work / "archive").mkdir()
    sha = publish(work / "images/flowers", work / "archive")
    (work / "project").mkdir()
    root = make_project(work / "project", str(work / "archive/flowers.tgz"), sha, save_tiny_backbone(work / "tiny"))
    set_params(root, **{"train.epochs": 20})
    run(root, "dvc", "repro")  # download, split and bottlenecks once; the rounds rerun what logs
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median per store)")
    parser.add_argument("--per-class", type=int, default=16, help="generated images per class (3 classes)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="retrain-bench-team-"))
    os.environ["RETRAIN_CACHE_DIR"] = str(work / "cache")
    root = project(work, args.per_class)
    times = {"sqlite": [], "team": []}
    with postgres() as pg, mlflow_team_server(pg.create_database("mlflow"), work / "server", workers=2) as uri:
        timed_repro(root, uri)  # warm-up: the server's first requests create the experiment
        for _ in range(args.rounds):
            times["sqlite"].append(timed_repro(root, None))
            times["team"].append(timed_repro(root, uri))
    median = {store: statistics.median(values) for store, values in times.items()}
    result = {
        "command": " ".join(["benchmarks/bench_team.py", *sys.argv[1:]]),
        "images": 3 * args.per_class,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "seconds": times,
        "median_seconds": median,
        "team_over_sqlite": median["team"] / median["sqlite"],
    }
    print(f"{'store':<42} {'median s':>9}  rounds")
    print(
        f"{'SQLite in the clone (default)':<42} {median['sqlite']:>9.1f}  {', '.join(f'{t:.1f}' for t in times['sqlite'])}"
    )
    print(
        f"{'PostgreSQL + proxied artifacts (team)':<42} {median['team']:>9.1f}  {', '.join(f'{t:.1f}' for t in times['team'])}"
    )
    print(
        f"team / SQLite: {result['team_over_sqlite']:.2f}x  (dvc repro --force --downstream train, {3 * args.per_class} images)"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
