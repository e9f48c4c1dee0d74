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
    shutil.rmtree(project / "data", ignore_errors=True)  # each test's own provenance files
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


def _stage(stage, params, metrics=None, **tags):
    with tracking.stage_run(stage, params) as run:
        if metrics:
            run.log_metrics(metrics)
        run.set_tags(tags)
    return run.run_id


def _runs(name="retrain"):
    client = mlflow.MlflowClient()
    return client.search_runs([client.get_experiment_by_name(name).experiment_id])


def test_stages_of_one_execution_share_one_run_named_after_the_dvc_experiment(workspace, monkeypatch):
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"], check=True
    )
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lark")
    monkeypatch.setenv("RETRAIN_EXECUTION", "execution-1")
    params = default_params(**{"tracking.experiment": "named"})
    first = _stage("train", params, {"val/loss": 0.5}, **{"train.epochs": 3})
    second = _stage("evaluate", params, {"test/accuracy": 0.75})
    assert first == second
    (run,) = _runs("named")
    assert run.info.run_name == "lucky-lark" and run.info.status == "FINISHED"
    assert run.data.params["train.learning_rate"] == str(params.train.learning_rate) and "data.url" in run.data.params
    assert run.data.metrics == {"val/loss": 0.5, "test/accuracy": 0.75}
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == commit and tags["dvc_experiment"] == "lucky-lark"
    assert tags["retrain.ran.train"] == tags["retrain.ran.evaluate"] == "true" and tags["train.epochs"] == "3"
    provenance = json.loads((workspace / "data/runs/evaluate.json").read_text())
    assert provenance["run_id"] == run.info.run_id and provenance["metrics"]["test/accuracy"][0][1] == 0.75
    experiment = mlflow.MlflowClient().get_experiment_by_name("named")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_later_execution_records_the_reused_stage_and_leaves_the_earlier_run_alone(workspace, monkeypatch):
    params = default_params(**{"tracking.experiment": "reuse"})
    monkeypatch.setenv("RETRAIN_EXECUTION", "baseline")
    baseline = _stage("train", params, {"train/loss": 0.9}, **{"backbone_id": "tiny"})
    _stage("evaluate", params, {"test/accuracy": 0.5})
    monkeypatch.setenv("RETRAIN_EXECUTION", "evaluate-only")
    later = _stage("evaluate", params, {"test/accuracy": 0.6})
    assert later != baseline
    client = mlflow.MlflowClient()
    old, new = client.get_run(baseline), client.get_run(later)
    assert old.data.metrics == {"train/loss": 0.9, "test/accuracy": 0.5}
    assert "retrain.reused.train" not in old.data.tags
    assert new.data.tags["retrain.reused.train"] == baseline and new.data.tags["backbone_id"] == "tiny"
    assert new.data.metrics == {"train/loss": 0.9, "test/accuracy": 0.6}  # the reused head's, copied
    assert "retrain.ran.train" not in new.data.tags


def test_a_failing_stage_marks_the_run_failed_and_records_no_provenance(workspace, monkeypatch):
    monkeypatch.setenv("RETRAIN_EXECUTION", "failing")
    params = default_params(**{"tracking.experiment": "failing"})
    with pytest.raises(ValueError), tracking.stage_run("export", params):
        raise ValueError("boom")
    (run,) = _runs("failing")
    assert run.info.status == "FAILED"
    provenance = tracking.read_provenance("export", workspace)
    assert provenance is None or provenance["run_id"] != run.info.run_id


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


def test_a_dead_tracking_server_is_one_line_after_a_few_retries(workspace, monkeypatch):
    from retrain.errors import RetrainError

    monkeypatch.setenv("RETRAIN_EXECUTION", "dead-server")
    with _HangingUpServer() as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        with pytest.raises(
            RetrainError, match=r"MLflow tracking store http://127\.0\.0\.1:\d+ failed .*rerun"
        ) as error:
            _stage("train", default_params())
    # Seconds, not MLflow's default of minutes: one request, retried MLFLOW_HTTP_REQUEST_MAX_RETRIES times.
    assert 1 <= server.attempts <= 1 + int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]), server.attempts
    assert "\n" not in str(error.value)


def test_a_run_left_running_by_a_killed_process_is_marked_failed_by_the_next_stage(workspace, monkeypatch):
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
    monkeypatch.setenv("RETRAIN_EXECUTION", "after-the-kill")
    _stage("train", params)
    assert client.get_run(stale.info.run_id).info.status == "FAILED"
    assert "ended without closing the run" in client.get_run(stale.info.run_id).data.tags["retrain.failure"]
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"  # its process still lives
