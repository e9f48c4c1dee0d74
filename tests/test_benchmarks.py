"""`benchmarks/run.py` runs end to end on a few generated images, writes its table as JSON, exits 1
exactly when a target fails, and judges each target from the figures it measured."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory):
    """One --quick-sized run of the harness on generated JPEGs: (process result, saved JSON)."""
    results = tmp_path_factory.mktemp("bench")
    command = [
        sys.executable,
        str(REPO / "benchmarks/run.py"),
        "--data",
        str(results / "absent.tgz"),
        "--images",
        "40",
        "--compare-images",
        "8",
        "--rounds",
        "1",
        "--sweep-experiments",
        "1",
        "--sweep-before",
        "none",
        "--ray-rounds",
        "1",
        "--results",
        str(results),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result, json.loads((results / "latest.json").read_text())


def _measure():
    """benchmarks/measure.py (it imports its neighbours, and tests/ is already on sys.path)."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.append(str(REPO / "benchmarks"))
    import measure

    return measure


def test_the_benchmark_harness_runs_and_its_exit_code_says_whether_a_target_failed(harness_run):
    result, saved = harness_run
    assert "generated JPEGs" in result.stdout and "| figure | value | target |" in result.stdout
    assert saved["pipeline"]["incremental"]["stats"]["computed"] == 10
    table = saved["table"]
    assert len(table) >= 19 and len({row["figure"] for row in table}) == len(table)
    for row in table:  # a row with a target is judged (True/False); a row without one is a figure only
        assert (row["pass"] in (True, False)) if row["target"] else row["pass"] is None, row
    failed = [row["figure"] for row in table if row["pass"] is False]
    assert result.returncode == (1 if failed else 0), (failed, result.stderr[-2000:])
    for row in table:  # the printed table shows the same verdicts
        verdict = "" if row["pass"] is None else ("PASS" if row["pass"] else "FAIL")
        assert f"| {row['target']} | {verdict} |" in result.stdout, row["figure"]


def test_each_target_is_judged_from_the_measured_figures(harness_run):
    """The same saved figures, edited one at a time to either side of a target, flip its verdict."""
    measure = _measure()
    _, saved = harness_run
    assert measure.table(saved) == saved["table"]  # the saved verdicts are the table's own

    def verdict(figure_start, edit):
        result = copy.deepcopy(saved)
        edit(result)
        (row,) = [row for row in measure.table(result) if row["figure"].startswith(figure_start)]
        return row["pass"]

    def fit(seconds):
        return lambda r: r["pipeline"]["train"].update(fit_s=seconds)

    assert verdict("train, default params", fit(3.9)) is True
    assert verdict("train, default params", fit(4.1)) is False

    def recomputed(n):
        return lambda r: r["pipeline"]["incremental"]["stats"].update(computed=n)

    assert verdict("+10 images, warm cache", recomputed(10)) is True
    assert verdict("+10 images, warm cache", recomputed(11)) is False

    def noop(seconds, ran):
        return lambda r: r["pipeline"].update(noop={"wall_s": [seconds], "ran": [ran]})

    assert verdict("no-op `dvc repro`", noop(1.0, False)) is True
    assert verdict("no-op `dvc repro`", noop(6.0, False)) is False
    assert verdict("no-op `dvc repro`", noop(1.0, True)) is False

    def per_experiment(seconds):
        return lambda r: r["sweep"].update(per_experiment_s=seconds)

    assert saved["sweep"]["experiments_logged"] == 1  # the queued experiment ran and logged its run
    assert verdict("queued head-only experiment", per_experiment(44.9)) is True
    assert verdict("queued head-only experiment", per_experiment(45.1)) is False

    def startup(stage, ratio, imports_tf=False):
        return lambda r: r["startup"][stage].update(vs_bare_import=ratio, imports_tensorflow=imports_tf)

    what = {"split": "", "bottlenecks": " + model load + 1 image", "evaluate": " + head and test features"}
    for stage in what:  # issue #25: lean stages start in a quarter of TensorFlow's import, without it
        figure = f"start-up (imports{what[stage]}): {stage}"
        assert verdict(figure, startup(stage, 0.2)) is True, stage
        assert verdict(figure, startup(stage, 0.3)) is False, stage
        assert verdict(figure, startup(stage, 0.2, imports_tf=True)) is False, stage

    def predict(ratio=None, rss=None):
        def edit(r):
            if ratio is not None:
                r["startup"]["predict"]["vs_bare_import"] = ratio
            if rss is not None:
                r["startup"]["predict"]["peak_rss_mb"] = rss

        return edit

    assert verdict("cold `retrain predict one.jpg`, default", predict(ratio=0.24)) is True
    assert verdict("cold `retrain predict one.jpg`, default", predict(ratio=0.26)) is False
    assert verdict("cold `retrain predict one.jpg`: peak RSS", predict(rss=290)) is True
    assert verdict("cold `retrain predict one.jpg`: peak RSS", predict(rss=310)) is False

    def before(seconds):  # the same sweep of an earlier commit, as `--sweep-before` adds it
        return lambda r: r["sweep"].update(before={**r["sweep"], "rev": "old", "per_experiment_s": seconds})

    now = saved["sweep"]["per_experiment_s"]
    assert verdict("queued head-only experiment ÷", before(now / 0.59)) is True
    assert verdict("queued head-only experiment ÷", before(now / 0.61)) is False

    if "ray" in saved:  # part E, where ray is installed

        def ray(**changes):
            return lambda r: r["ray"].update(changes)

        assert verdict("Ray ÷ local bottlenecks", ray(steady_ratio=0.86)) is True
        assert verdict("Ray ÷ local bottlenecks", ray(steady_ratio=0.84)) is False
        assert verdict("Ray's fixed cost", ray(fixed_difference_s=9.9)) is True
        assert verdict("Ray's fixed cost", ray(fixed_difference_s=10.1)) is False
        assert verdict("Ray's arrays", ray(arrays_identical=False)) is False
        assert saved["ray"]["arrays_identical"], saved["ray"]["runs"]
