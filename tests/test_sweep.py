"""A sweep through DVC's queue: `dvc exp run --queue -S ...` then `dvc queue start`.

Queued experiments run in temporary copies of the repo; they must log to the workspace's default
MLflow store (DVC sets `DVC_ROOT`), be named after their DVC experiments, reuse the features the
workspace computed, and show up in `dvc exp show` with their test accuracy.
"""

import json
import time
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest

from imagegen import make_class_folders
from project import CLASSES, make_project, publish, ran_stages, run, set_params

pytestmark = pytest.mark.slow

RATES = ("0.01", "0.03")


def _wait_for_queue(root, timeout=600) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = run(root, "dvc", "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"queue still busy after {timeout}s:\n{status}")
        time.sleep(3)


def _experiments(root) -> dict[str, dict]:
    """name → {"params": params.yaml values, "metrics": metrics.json values} from `dvc exp show --json`."""
    found = {}
    for commit in json.loads(run(root, "dvc", "exp", "show", "--json").stdout):
        for experiment in commit.get("experiments") or []:
            for rev in experiment["revs"]:
                data = rev.get("data") or {}
                found[rev.get("name") or rev["rev"]] = {
                    "params": data["params"]["params.yaml"]["data"],
                    "metrics": data["metrics"]["data/evaluate/metrics.json"]["data"],
                }
    return found


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_backbone):
    folder = tmp_path_factory.mktemp("images")
    make_class_folders(folder / "flowers", CLASSES, per_class=12, size=(64, 64))
    archive = folder / "archive"
    archive.mkdir()
    sha = publish(folder / "flowers", archive)
    root = make_project(tmp_path_factory.mktemp("sweep"), str(archive / "flowers.tgz"), sha, tiny_backbone)
    set_params(root, **{"export.tflite": False, "train.epochs": 20})
    run(root, "dvc", "repro")
    run(root, "git", "add", "-A")
    run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline")
    baseline = run(root, "git", "rev-parse", "HEAD").stdout.strip()
    run(root, "dvc", "exp", "run", "--queue", "-S", f"train.learning_rate={','.join(RATES)}")
    try:
        run(root, "dvc", "queue", "start", "-j", "1")
        status = _wait_for_queue(root)
    finally:
        run(root, "dvc", "queue", "stop", check=False)  # no worker outlives the test
    return {"root": root, "baseline": baseline, "status": status, "experiments": _experiments(root)}


def test_dvc_exp_show_lists_each_experiment_with_its_test_accuracy(swept):
    experiments = swept["experiments"]
    assert len(experiments) == 2, swept["status"]
    assert sorted(str(e["params"]["train"]["learning_rate"]) for e in experiments.values()) == sorted(RATES)
    for experiment in experiments.values():
        assert 0.0 <= experiment["metrics"]["accuracy"] <= 1.0


def test_queued_runs_log_to_the_workspace_store_named_after_their_experiments(swept):
    root = swept["root"]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("retrain").experiment_id])}
    assert len(runs) == 3  # the baseline `dvc repro` and the two queued experiments
    for name, experiment in swept["experiments"].items():
        logged = runs[name]
        assert logged.info.status == "FINISHED"
        assert logged.data.params["train.learning_rate"] == str(experiment["params"]["train"]["learning_rate"])
        assert logged.data.metrics["test_accuracy"] == pytest.approx(experiment["metrics"]["accuracy"])
        assert logged.data.tags["dvc_experiment"] == name and logged.data.tags["git_commit"] == swept["baseline"]
        assert logged.data.tags["backbone_id"] and logged.data.tags["dataset_hash"]
        assert logged.info.artifact_uri.startswith((root / "mlartifacts").as_uri())  # not the deleted temp copy
        assert {"reports", "labels.txt"} <= {a.path for a in client.list_artifacts(logged.info.run_id)}
    versions = client.search_model_versions("name='retrain-classifier'")
    assert {v.run_id for v in versions} == {r.info.run_id for r in runs.values()}
    for version in versions:  # each model's files live in the workspace, not in a deleted temp copy
        location = client.get_logged_model(version.source.removeprefix("models:/")).artifact_location
        assert location.startswith((root / "mlartifacts").as_uri())
        assert (Path(urlparse(location).path) / "MLmodel").is_file()


def test_queued_runs_reuse_the_workspace_features(swept):
    for name in swept["experiments"]:
        log = run(swept["root"], "dvc", "queue", "logs", name)
        assert "Stage 'bottlenecks' didn't change, skipping" in log.stdout, log.stdout[-3000:]
        assert ran_stages(log)[0] == "train"
