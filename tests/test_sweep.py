"""Experiments as a user runs them: one MLflow run per execution, whichever stages it reruns.

One throwaway project: a baseline `dvc repro`, then `dvc exp run -S 'evaluate.top_k=[1,3]'` in
the workspace (evaluate and export rerun, train is reused), then a queued sweep of two learning
rates by two backbone sizes through `dvc queue start -j 4`, then `retrain promote`. Queued
experiments run in temporary copies of the repo, all four at once; they must log to the
workspace's store, under their own names, with their TensorBoard files in the workspace, and leave
the registry alone until a promote. The two at a new size compute the same features at the same
time into the one shared cache: every entry must come out whole and as a serial run computes it.
"""

import json
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pytest

from project import generated_project, ran_stages, run, set_params, wait_for_queue

pytestmark = pytest.mark.slow

RATES = ("0.01", "0.03")
SIZES = (32, 40)  # the baseline's backbone size, and a new one that two workers compute at once


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


def _runs(client) -> dict[str, object]:
    experiment = client.get_experiment_by_name("retrain")
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def _snapshot(client, run_id) -> dict:
    run_ = client.get_run(run_id)
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in run_.data.metrics}
    return {"params": run_.data.params, "metrics": run_.data.metrics, "history": history, "status": run_.info.status}


@pytest.fixture(scope="module")
def any_size_backbone(tmp_path_factory):
    """The tiny test backbone with a dynamic input size, so an experiment can change the size."""
    from conftest import save_tiny_backbone

    return save_tiny_backbone(tmp_path_factory.mktemp("any-size") / "tiny_any_size", size=None)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, any_size_backbone):
    root = generated_project(tmp_path_factory, "sweep", any_size_backbone)
    set_params(root, **{"backbone.image_size": SIZES[0]})
    store = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(store, registry_uri=store)  # else the registry is the process default
    run(root, "dvc", "repro")
    run(root, "git", "add", "-A")
    run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline")
    baseline_commit = run(root, "git", "rev-parse", "HEAD").stdout.strip()
    (baseline,) = _runs(client).values()
    before = _snapshot(client, baseline.info.run_id)
    topk = run(root, "dvc", "exp", "run", "-n", "topk13", "-S", "evaluate.top_k=[1,3]")
    nothing = run(root, "dvc", "exp", "run", "-n", "again")  # the workspace already has these results
    runs_after_topk = _runs(client)
    run(
        root,
        "dvc",
        "exp",
        "run",
        "--queue",
        "-S",
        f"train.learning_rate={','.join(RATES)}",
        "-S",
        f"backbone.image_size={','.join(map(str, SIZES))}",
    )  # the grid: 4 experiments
    try:
        run(root, "dvc", "queue", "start", "-j", "4")
        status = wait_for_queue(root)
    finally:
        run(root, "dvc", "queue", "stop", check=False)  # no worker outlives the test
    return {
        "root": root,
        "client": client,
        "baseline": baseline,
        "before": before,
        "topk": topk,
        "nothing": nothing,
        "runs_after_topk": runs_after_topk,
        "baseline_commit": baseline_commit,
        "status": status,
        "experiments": _experiments(root),
    }


def test_an_evaluate_only_experiment_gets_its_own_run_pointing_to_the_reused_head(swept):
    assert ran_stages(swept["topk"]) == ["evaluate", "export", "log"]
    runs, baseline = swept["runs_after_topk"], swept["baseline"]
    assert sorted(runs) == sorted([baseline.info.run_name, "topk13"])
    topk = runs["topk13"]
    assert topk.info.status == "FINISHED" and topk.data.params["evaluate.top_k"] == "[1, 3]"
    assert "test/top_3_accuracy" in topk.data.metrics
    tags = topk.data.tags
    for stage in ("download", "split", "bottlenecks", "train", "finetune"):
        assert tags[f"retrain.reused.{stage}"] == baseline.info.run_id, stage
    assert tags["retrain.ran.evaluate"] == tags["retrain.ran.export"] == "true"
    assert "retrain.ran.train" not in tags
    # The reused head's curves and bookkeeping are copied, so the run compares completely.
    client = swept["client"]
    assert swept["before"]["history"]["train/loss"] == [
        (m.step, m.value) for m in client.get_metric_history(topk.info.run_id, "train/loss")
    ]
    assert tags["backbone_id"] == baseline.data.tags["backbone_id"]


def test_a_later_execution_never_changes_the_baseline_run(swept):
    assert _snapshot(swept["client"], swept["baseline"].info.run_id) == swept["before"]
    assert swept["before"]["params"]["evaluate.top_k"] == "[1, 2]"
    assert "test/top_3_accuracy" not in swept["before"]["metrics"]


def test_an_execution_that_runs_nothing_makes_no_run(swept):
    assert ran_stages(swept["nothing"]) == []
    assert "again" not in swept["runs_after_topk"]


def _queued(swept) -> dict[str, dict]:
    return {name: e for name, e in swept["experiments"].items() if name not in ("topk13", "again")}


def test_dvc_exp_show_lists_each_queued_experiment_with_its_params_and_accuracy(swept):
    queued = _queued(swept)
    grid = sorted(
        (str(e["params"]["train"]["learning_rate"]), e["params"]["backbone"]["image_size"]) for e in queued.values()
    )
    assert grid == sorted((rate, size) for rate in RATES for size in SIZES), swept["status"]
    runs = _runs(swept["client"])
    for name, experiment in queued.items():
        assert runs[name].data.metrics["test/accuracy"] == experiment["metrics"]["accuracy"]


def test_queued_runs_log_to_the_workspace_store_named_after_their_experiments(swept):
    root, client = swept["root"], swept["client"]
    runs = _runs(client)
    assert len(runs) == 6, sorted(runs)  # baseline, topk13 and the four queued experiments
    for name, experiment in _queued(swept).items():
        logged = runs[name]
        assert logged.info.status == "FINISHED"
        assert logged.data.params["train.learning_rate"] == str(experiment["params"]["train"]["learning_rate"])
        tags = logged.data.tags
        assert tags["dvc_experiment"] == name and tags["mlflow.source.git.commit"] == swept["baseline_commit"]
        if experiment["params"]["backbone"]["image_size"] == SIZES[0]:
            assert tags["retrain.reused.bottlenecks"] == swept["baseline"].info.run_id
        else:
            assert tags["retrain.ran.bottlenecks"] == "true" and "retrain.reused.bottlenecks" not in tags
        assert tags["retrain.ran.train"] == "true"
        assert sorted(d.dataset.name for d in logged.inputs.dataset_inputs) == ["test", "train", "validation"]
        assert logged.info.artifact_uri.startswith((root / "mlartifacts").as_uri())  # not the deleted temp copy
        assert {"reports", "labels.txt", "tensorboard"} <= {a.path for a in client.list_artifacts(logged.info.run_id)}
        location = client.get_logged_model(tags["retrain.model_uri"].removeprefix("models:/")).artifact_location
        assert location.startswith((root / "mlartifacts").as_uri())
        assert (Path(urlparse(location).path) / "MLmodel").is_file()
        events = list((root / "logs" / name).rglob("events.out.tfevents.*"))  # survives the temp copy
        assert {p.parent.name for p in events} >= {"train", "validation", "test"}, events


def test_experiments_leave_the_registry_alone_until_promote(swept, monkeypatch):
    root, client = swept["root"], swept["client"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    assert client.search_registered_models() == []
    name = next(n for n in swept["experiments"] if n not in ("topk13", "again"))
    out = run(root, "retrain", "promote", name, "--alias", "champion").stdout
    assert "models:/retrain-classifier@champion" in out
    version = client.get_model_version_by_alias("retrain-classifier", "champion")
    assert version.run_id is None or version.run_id == _runs(client)[name].info.run_id
    assert version.tags["retrain.run_id"] == _runs(client)[name].info.run_id
    model = mlflow.pyfunc.load_model("models:/retrain-classifier@champion")
    assert model.metadata.get_input_schema().input_names() == ["image"]
    refused = run(root, "retrain", "promote", "no-such-experiment", check=False)
    assert refused.returncode == 1 and "no MLflow run named 'no-such-experiment'" in refused.stderr


def test_queued_runs_reuse_the_workspace_features_at_the_same_size(swept):
    for name, experiment in _queued(swept).items():
        log = run(swept["root"], "dvc", "queue", "logs", name)
        same_size = experiment["params"]["backbone"]["image_size"] == SIZES[0]
        assert ran_stages(log)[0] == ("train" if same_size else "bottlenecks"), log.stdout[-3000:]


def test_parallel_workers_computing_one_new_size_leave_whole_entries_a_serial_run_would(swept, tmp_path, monkeypatch):
    from retrain.backbones import load_backbone
    from retrain.cache import cache_root
    from retrain.features import FeatureCache, compute_features, read_split

    root = swept["root"]
    monkeypatch.chdir(root)  # split.csv's paths are relative to the project
    examples = read_split(root / "data/split.csv")
    spec = json.loads((root / "data/finetune/backbone.json").read_text())["name"]
    backbone = load_backbone(spec, image_size=(SIZES[1], SIZES[1]), runtime="xnnpack")  # as the stage loads it
    serial = FeatureCache(tmp_path / "serial", backbone.id, backbone.feature_dim)
    compute_features(examples, backbone, serial, batch_size=4)
    shared = FeatureCache(cache_root() / "features", backbone.id, backbone.feature_dim)
    for example in examples:
        np.testing.assert_array_equal(shared.get(example.sha256), serial.get(example.sha256), err_msg=example.path)
    assert not [p for p in (cache_root() / "features").rglob(".tmp-*")]  # no half-written entry left
