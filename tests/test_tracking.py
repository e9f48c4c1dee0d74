"""MLflow tracking: where runs land, what they carry, and parallel queue workers on one SQLite store."""

import json
import multiprocessing
import os
import shutil
import subprocess

import mlflow
import pytest

from default_params import default_params
from retrain import tracking
from retrain.records import stage_record
from retrain.run_log import log_execution


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
    shutil.rmtree(project / "data", ignore_errors=True)  # each test's own records
    shutil.rmtree(project / "reports", ignore_errors=True)
    return project


@pytest.fixture
def fresh_workspace(tmp_path, monkeypatch):
    """An empty folder as the current directory: its mlflow.db does not exist yet."""
    _default_store_at(tmp_path, monkeypatch)
    return tmp_path


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


STAGES = ["train", "evaluate", "export"]  # the stages these tests write records for, in dvc.yaml's order


def _stage(stage, metrics=None, step=0, **tags):
    """What a stage does at its end: its record, data/runs/<stage>.json."""
    with stage_record(stage) as record:
        if metrics:
            record.log_metrics(metrics, step=step)
        record.set_tags(tags)
    return record


def _log(params):
    return log_execution(params, stages=STAGES)


def _runs(name="retrain"):
    client = mlflow.MlflowClient()
    return client.search_runs([client.get_experiment_by_name(name).experiment_id])


def test_one_execution_is_one_run_named_after_the_dvc_experiment(workspace, monkeypatch):
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"], check=True
    )
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lark")
    params = default_params(**{"tracking.experiment": "named"})
    with stage_record("train") as train:
        for epoch, loss in enumerate([0.9, 0.5]):
            train.log_metrics({"val/loss": loss}, step=epoch)
        train.set_tags({"train.epochs": 2})
        train.add_child("trial-00", {"train.dropout": 0.3}, {"val/loss": [0.8, 0.7]}, {"retrain.trial": 0})
    _stage("evaluate", {"test/accuracy": 0.75})
    logged = _log(params)
    run = mlflow.MlflowClient().get_run(logged["run_id"])
    assert run.info.run_name == "lucky-lark" and run.info.status == "FINISHED"
    assert run.data.params["train.learning_rate"] == str(params.train.learning_rate) and "data.url" in run.data.params
    assert run.data.metrics == {"val/loss": 0.5, "test/accuracy": 0.75}
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val/loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.9), (1, 0.5)]
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == commit and tags["dvc_experiment"] == "lucky-lark"
    assert tags["retrain.ran.train"] == tags["retrain.ran.evaluate"] == "true" and tags["train.epochs"] == "2"
    (trial,) = [r for r in _runs("named") if r.info.run_id != run.info.run_id]
    assert trial.info.run_name == "lucky-lark-trial-00" and trial.data.tags["mlflow.parentRunId"] == run.info.run_id
    assert trial.data.params == {"train.dropout": "0.3"} and trial.data.metrics == {"val/loss": 0.7}
    assert json.loads((workspace / "data/runs/log.json").read_text())["run_id"] == run.info.run_id
    experiment = mlflow.MlflowClient().get_experiment_by_name("named")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_later_execution_records_the_reused_stage_and_leaves_the_earlier_run_alone(workspace):
    params = default_params(**{"tracking.experiment": "reuse"})
    _stage("train", {"train/loss": 0.9}, backbone_id="tiny")
    _stage("evaluate", {"test/accuracy": 0.5})
    baseline = _log(params)["run_id"]
    _stage("evaluate", {"test/accuracy": 0.6})  # an experiment that reruns evaluate only
    later = _log(params)["run_id"]
    assert later != baseline
    client = mlflow.MlflowClient()
    old, new = client.get_run(baseline), client.get_run(later)
    assert old.data.metrics == {"train/loss": 0.9, "test/accuracy": 0.5}
    assert "retrain.reused.train" not in old.data.tags
    assert new.data.tags["retrain.reused.train"] == baseline and new.data.tags["backbone_id"] == "tiny"
    assert new.data.metrics == {"train/loss": 0.9, "test/accuracy": 0.6}  # the reused head's, copied
    assert "retrain.ran.train" not in new.data.tags and new.data.tags["retrain.ran.evaluate"] == "true"


def test_an_execution_whose_stages_are_all_logged_makes_no_run(workspace):
    params = default_params(**{"tracking.experiment": "nothing-new"})
    _stage("train", {"train/loss": 0.9})
    first = _log(params)
    again = _log(params)  # `dvc repro --force log`: nothing ran since
    assert not again["new_run"] and again["run_id"] == first["run_id"]
    assert len(_runs("nothing-new")) == 1


def test_a_log_that_fails_midway_is_marked_failed_and_its_retry_replaces_it(workspace):
    params = default_params(**{"tracking.experiment": "retry"})
    _stage("train", {"train/loss": 0.9})
    with stage_record("evaluate") as record:
        record.log_artifacts(workspace / "reports", "reports")  # not there yet: the upload fails
    with pytest.raises(OSError):
        _log(params)
    (failed,) = _runs("retry")
    assert failed.info.status == "FAILED" and failed.data.tags["retrain.ran.train"] == "true"
    assert not (workspace / "data/runs/log.json").exists()
    (workspace / "reports").mkdir()
    (workspace / "reports" / "per_class.md").write_text("| class |\n")
    retried = _log(params)  # what `dvc repro` does next: only the log stage reruns
    (run,) = _runs("retry")  # the failed attempt went to MLflow's trash
    assert run.info.run_id == retried["run_id"] != failed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["retrain.ran.train"] == run.data.tags["retrain.ran.evaluate"] == "true"
    assert mlflow.MlflowClient().get_run(failed.info.run_id).info.lifecycle_stage == "deleted"


class _HangingUpServer:
    """A loopback port that accepts each connection and closes it at once: a tracking server that
    is down. `attempts` counts the connections, so a test bounds the retries without a clock."""

    def __init__(self):
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.uri, self.attempts, self._stop = f"http://127.0.0.1:{self.sock.getsockname()[1]}", 0, threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        while not self._stop.is_set():
            try:
                connection, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.attempts += 1
            connection.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        self.sock.close()


def test_a_dead_tracking_server_is_one_line_after_a_few_retries_and_loses_no_work(workspace, monkeypatch):
    from retrain.errors import RetrainError

    params = default_params(**{"tracking.experiment": "dead-server"})
    _stage("train", {"train/loss": 0.9})
    with _HangingUpServer() as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        with pytest.raises(
            RetrainError, match=r"MLflow tracking store http://127\.0\.0\.1:\d+ failed .*rerun"
        ) as error:
            _log(params)
    # Seconds, not MLflow's default of minutes: one request, retried MLFLOW_HTTP_REQUEST_MAX_RETRIES times.
    assert 1 <= server.attempts <= 1 + int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]), server.attempts
    assert "\n" not in str(error.value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the store is back: the train record is logged as this execution's
    logged = _log(params)
    run = mlflow.MlflowClient().get_run(logged["run_id"])
    assert run.data.tags["retrain.ran.train"] == "true" and run.data.metrics == {"train/loss": 0.9}


def test_a_run_left_running_by_a_killed_process_is_marked_failed_by_the_next_log(workspace):
    import socket

    dead = subprocess.Popen(["true"])
    dead.wait()  # a process id that no longer runs
    params = default_params(**{"tracking.experiment": "stale"})
    experiment_id = tracking.use_experiment("stale")
    client = mlflow.MlflowClient()
    stale = client.create_run(experiment_id, tags={"retrain.pid": str(dead.pid), "retrain.host": socket.gethostname()})
    alive = client.create_run(
        experiment_id, tags={"retrain.pid": str(os.getppid()), "retrain.host": socket.gethostname()}
    )
    _stage("train")
    _log(params)
    assert client.get_run(stale.info.run_id).info.status == "FAILED"
    assert "ended without closing the run" in client.get_run(stale.info.run_id).data.tags["retrain.failure"]
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"  # its process still lives
