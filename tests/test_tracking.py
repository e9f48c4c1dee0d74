"""MLflow tracking: where runs land, what they carry, and parallel queue workers on one SQLite store."""

import json
import multiprocessing
import subprocess

import mlflow
import pytest

from retrain import tracking


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """One project folder for the module: a new mlflow.db costs seconds of migrations."""
    return tmp_path_factory.mktemp("project")


def _default_store_at(folder, monkeypatch):
    monkeypatch.chdir(folder)
    for name in ("DVC_ROOT", "DVC_EXP_NAME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def workspace(project, monkeypatch):
    """The project folder as the current directory, on the default (SQLite) store."""
    _default_store_at(project, monkeypatch)
    yield project
    mlflow.set_tracking_uri(None)


@pytest.fixture
def fresh_workspace(tmp_path, monkeypatch):
    """An empty folder as the current directory: its mlflow.db does not exist yet."""
    _default_store_at(tmp_path, monkeypatch)
    yield tmp_path
    mlflow.set_tracking_uri(None)


def _use_experiment_at_once(barrier, results):
    barrier.wait()
    try:
        results.put(tracking.use_experiment("x"))
    except Exception as error:  # reported to the test, not lost in a child's stderr
        results.put(f"{type(error).__name__}: {error}")


def test_parallel_workers_share_one_new_experiment_on_a_fresh_store(fresh_workspace):
    # Like `dvc queue start -j N` on a project that has never logged: every worker's first call
    # creates the database and the experiment at the same moment.
    workers = 3
    context = multiprocessing.get_context("fork")  # the children share this process's imports
    barrier, results = context.Barrier(workers), context.Queue()
    processes = [context.Process(target=_use_experiment_at_once, args=(barrier, results)) for _ in range(workers)]
    for process in processes:
        process.start()
    answers = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert len(set(answers)) == 1, answers
    client = mlflow.MlflowClient(f"sqlite:///{fresh_workspace / 'mlflow.db'}")
    assert [e.name for e in client.search_experiments() if e.name == "x"] == ["x"]
    assert client.get_experiment_by_name("x").experiment_id == answers[0]


def test_temporary_experiment_copies_log_to_the_parent_repos_store(project, tmp_path, monkeypatch):
    _default_store_at(tmp_path, monkeypatch)  # the temporary copy DVC runs a queued experiment in
    monkeypatch.setenv("DVC_ROOT", str(project))  # what DVC sets: the workspace
    assert tracking.tracking_uri() == f"sqlite:///{project.resolve() / 'mlflow.db'}"
    tracking.use_experiment("sweep")
    experiment = mlflow.MlflowClient().get_experiment_by_name("sweep")
    assert experiment.artifact_location == (project.resolve() / "mlartifacts").as_uri()
    assert (project / "mlflow.db").is_file() and not (tmp_path / "mlflow.db").exists()
    mlflow.set_tracking_uri(None)


def test_a_run_is_named_after_the_dvc_experiment_and_tagged(workspace, monkeypatch):
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lark")
    run_file = workspace / "data/train/run.json"
    run_id = tracking.start_run("retrain", {"train.learning_rate": 0.01, "seed": 42},
                                {"backbone_id": "tiny-abc", "dataset_hash": "d41d8c"}, run_file)
    assert json.loads(run_file.read_text()) == {"run_id": run_id, "run_name": "lucky-lark", "experiment": "retrain"}
    with tracking.resumed_run(run_file):
        mlflow.log_metric("test_accuracy", 0.5)
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.run_name == "lucky-lark" and run.info.status == "FINISHED"
    assert run.data.params == {"train.learning_rate": "0.01", "seed": "42"}
    tags = run.data.tags
    assert tags["git_commit"] == commit and tags["dvc_experiment"] == "lucky-lark"
    assert tags["backbone_id"] == "tiny-abc" and tags["dataset_hash"] == "d41d8c"


def test_a_failing_stage_marks_the_run_failed(workspace):
    run_file = workspace / "run.json"
    run_id = tracking.start_run("retrain", {}, {}, run_file)
    with pytest.raises(ValueError), tracking.resumed_run(run_file):
        raise ValueError("boom")
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FAILED"


def test_a_missing_run_is_one_clear_line(workspace):
    from retrain.errors import RetrainError

    run_file = workspace / "run.json"
    run_file.write_text(json.dumps({"run_id": "0" * 32, "run_name": "gone", "experiment": "retrain"}))
    with pytest.raises(RetrainError, match="not found"):
        with tracking.resumed_run(run_file):
            pass
