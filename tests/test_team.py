"""A team on one tracking server: PostgreSQL backend, proxied artifacts, basic auth, a DVC remote.

One real PostgreSQL and one real `mlflow server --serve-artifacts` on it serve the module. The
"origin" project runs the pipeline there, pushes its outputs to a local DVC remote, and teammates
clone it: a fresh clone pulls and reruns nothing; two clones and a two-worker queued sweep log at
once, each run complete under its own name, and a killed stage's run is swept to FAILED. A second
server on the same store turns on basic auth. The tests run in file order and share the origin.
"""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest

from conftest import free_port, wait_until_serving
from imagegen import image_bytes
from project import BIN, CLASSES, REPO, generated_project, ran_stages, run, wait_for_queue
from team_servers import MLFLOW, mlflow_team_server, postgres

pytestmark = pytest.mark.slow

MODEL = "retrain-classifier"
GIT = ("git", "-c", "user.name=t", "-c", "user.email=t@t")


@pytest.fixture(scope="module")
def cluster():
    with postgres() as pg:
        yield pg


@pytest.fixture(scope="module")
def team(cluster, tmp_path_factory):
    """The team's server: {"uri", "artifacts"} (the folder only the server writes)."""
    folder = tmp_path_factory.mktemp("team-server")
    with mlflow_team_server(cluster.create_database("mlflow"), folder) as uri:
        yield {"uri": uri, "artifacts": folder / "artifacts"}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """The team's per-image feature cache: one RETRAIN_CACHE_DIR path every teammate sets."""
    folder = tmp_path_factory.mktemp("shared-feature-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RETRAIN_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def origin(tmp_path_factory, shared_cache, tiny_backbone, team):
    """A project that ran `dvc repro` against the team server and pushed its outputs to a remote."""
    root = generated_project(tmp_path_factory, "origin", tiny_backbone, per_class=10)
    first = run(root, "dvc", "repro", tracking_uri=team["uri"])
    remote = tmp_path_factory.mktemp("dvc-remote")
    run(root, "dvc", "remote", "add", "-d", "team", str(remote))
    run(root, *GIT, "add", "-A")
    run(root, *GIT, "commit", "-qm", "pipeline outputs and the team's DVC remote")
    pushed = run(root, "dvc", "push")
    return {"root": root, "first": first, "remote": remote, "pushed": pushed}


def _client(team) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(team["uri"])


def _runs(team) -> list:
    client = _client(team)
    return client.search_runs([client.get_experiment_by_name("retrain").experiment_id], max_results=1000)


def _clone(origin, folder: Path, name: str) -> Path:
    """A teammate's fresh clone with the pipeline's outputs pulled from the remote."""
    run(folder, "git", "clone", "-q", str(origin["root"]), name)
    run(folder / name, "dvc", "pull")
    return folder / name


def test_a_pipeline_run_lands_complete_on_the_team_server(origin, team):
    assert "export" in ran_stages(origin["first"])
    (logged,) = _runs(team)
    client = _client(team)
    assert logged.info.status == "FINISHED"
    assert logged.data.params["train.learning_rate"] == "0.05" and "data.url" in logged.data.params
    assert logged.data.metrics["test/accuracy"] >= 0.9
    assert len(client.get_metric_history(logged.info.run_id, "val/loss")) > 1
    assert {d.dataset.name for d in logged.inputs.dataset_inputs} == {"train", "validation", "test"}
    # Proxied artifacts: the client only ever saw mlflow-artifacts:/ URIs; the files are the server's.
    assert logged.info.artifact_uri.startswith("mlflow-artifacts:/")
    reports = {a.path.split("/")[-1] for a in client.list_artifacts(logged.info.run_id, "reports")}
    assert {"confusion_matrix.png", "per_class.md"} <= reports
    assert list(team["artifacts"].rglob("confusion_matrix.png")) and list(team["artifacts"].rglob("MLmodel"))


def _invoke(url: str, image: bytes) -> dict:
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]}}
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["predictions"][0]
    except urllib.error.HTTPError as error:
        raise AssertionError(f"HTTP {error.code}: {error.read().decode()[:2000]}") from None


def test_a_promoted_model_serves_from_the_team_registry(origin, team, tmp_path):
    run(origin["root"], "retrain", "promote", "workspace", "--alias", "champion", tracking_uri=team["uri"])
    version = _client(team).get_model_version_by_alias(MODEL, "champion")
    assert version.run_id == _runs(team)[0].info.run_id
    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": team["uri"], "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(
        [
            str(MLFLOW),
            "models",
            "serve",
            "-m",
            f"models:/{MODEL}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/ping", process, log, timeout_s=300)
        answer = _invoke(f"http://127.0.0.1:{port}", image_bytes("JPEG", CLASSES["green"], (90, 70), seed=77))
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and its workers
        process.wait(timeout=60)
    assert answer["label"] == "green" and len(answer["top_k_labels"]) == 2


def test_a_teammates_fresh_clone_pulls_and_reruns_nothing(origin, team, tmp_path):
    assert "pushed" in origin["pushed"].stdout
    before = len(_runs(team))
    clone = _clone(origin, tmp_path, "teammate")
    result = run(clone, "dvc", "repro", tracking_uri=team["uri"])
    assert ran_stages(result) == [], result.stdout[-2000:]
    metrics = "data/evaluate/metrics.json"
    assert json.loads((clone / metrics).read_text()) == json.loads((origin["root"] / metrics).read_text())
    assert (clone / "model/saved_model/saved_model.pb").is_file()
    assert len(_runs(team)) == before  # nothing ran, so nothing was logged


def test_a_shared_feature_cache_computes_no_feature_twice(origin, team, shared_cache, tmp_path):
    # The per-image cache is outside DVC: a teammate whose RETRAIN_CACHE_DIR is the team's path
    # recomputes the feature arrays from it without running the backbone on any image.
    assert any(shared_cache.iterdir())
    clone = _clone(origin, tmp_path, "teammate")
    run(clone, "dvc", "repro", "--force", "--single-item", "bottlenecks", tracking_uri=team["uri"])
    stats = json.loads((clone / "data/bottlenecks.json").read_text())
    assert stats["computed"] == 0 and stats["cache_hits"] > 0


# Opens the execution's run the way the log stage does, then hangs until it is killed.
_HANGING_STAGE = """
import time
import mlflow
from retrain import tracking
from retrain.params import load_params
from retrain.run_log import create_run
params = load_params()
run = create_run(mlflow.MlflowClient(), tracking.use_experiment(params.tracking.experiment), params)
print(run.info.run_id, flush=True)
time.sleep(600)
"""


def _killed_stage_run(root: Path, team) -> str:
    """The id of a run left RUNNING by a log stage that was SIGKILLed while logging."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": team["uri"], "PYTHONPATH": str(root)}
    process = subprocess.Popen(
        [str(BIN / "python"), "-c", _HANGING_STAGE],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run_id = process.stdout.readline().strip()
    finally:
        process.kill()
        process.wait(timeout=30)
    assert run_id, process.stderr.read()[-3000:]
    assert _client(team).get_run(run_id).info.status == "RUNNING"
    return run_id


# Four pipelines at once on this 2-core machine: 814 s with other work running (load ~25-50),
# past the suite's 900 s per-test default in a second run.
@pytest.mark.timeout(1800)
def test_two_teammates_and_a_parallel_sweep_log_at_once(origin, team, tmp_path):
    alice, bob = _clone(origin, tmp_path, "alice"), _clone(origin, tmp_path, "bob")
    killed = _killed_stage_run(bob, team)
    rates = {"alice": "0.04", "bob": "0.06", "sweep-1": "0.02", "sweep-2": "0.03"}
    root = origin["root"]
    for name in ("sweep-1", "sweep-2"):
        run(
            root,
            "dvc",
            "exp",
            "run",
            "--queue",
            "-n",
            name,
            "-S",
            f"train.learning_rate={rates[name]}",
            tracking_uri=team["uri"],
        )
    env = {**os.environ, "MLFLOW_TRACKING_URI": team["uri"], "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    teammates = {
        name: subprocess.Popen(
            ["dvc", "exp", "run", "-n", name, "-S", f"train.learning_rate={rates[name]}"],
            cwd=clone,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, clone in (("alice", alice), ("bob", bob))
    }
    try:
        run(root, "dvc", "queue", "start", "-j", "2", tracking_uri=team["uri"])
        outputs = {name: process.communicate(timeout=600)[0] for name, process in teammates.items()}
        status = wait_for_queue(root)
    finally:
        run(root, "dvc", "queue", "stop", check=False)  # no worker outlives the test
        for process in teammates.values():
            process.kill()
    for name, process in teammates.items():
        assert process.returncode == 0, outputs[name][-3000:]
    runs = _runs(team)
    by_name = {name: [r for r in runs if r.info.run_name == name] for name in rates}
    assert {name: len(found) for name, found in by_name.items()} == dict.fromkeys(rates, 1), status
    for name, (logged,) in by_name.items():
        assert logged.info.status == "FINISHED", name
        assert logged.data.params["train.learning_rate"] == rates[name]
        assert "test/accuracy" in logged.data.metrics and logged.data.tags["dvc_experiment"] == name
        assert "reports" in {a.path for a in _client(team).list_artifacts(logged.info.run_id)}
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    swept = _client(team).get_run(killed)
    assert swept.info.status == "FAILED" and "killed" in swept.data.tags["retrain.failure"]


@pytest.fixture(scope="module")
def locked():
    """`make team-server AUTH=1`'s script on a folder of its own: {"uri", "dir", "log", "stop", admin, password}.

    The admin's password reaches the server through MLflow's environment variable, once; the folder
    is made with mkdtemp and opened to 0755 because under root the postgres user must enter it.
    """
    team_dir = Path(tempfile.mkdtemp(prefix="retrain-team-"))
    team_dir.chmod(0o755)
    port, log = free_port(), team_dir / "team-server.log"
    secret = {"admin": "admin", "password": "a-long-admin-secret-1"}
    env = {
        **os.environ,
        "TEAM_DIR": str(team_dir),
        "PORT": str(port),
        "PGPORT": str(free_port()),
        "WORKERS": "1",
        "AUTH": "1",
        "MLFLOW_AUTH_ADMIN_PASSWORD": secret["password"],
        "MLFLOW": str(MLFLOW),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    process = subprocess.Popen(
        [str(REPO / "scripts/team_server.sh")],
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def stop():
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # what Ctrl-C on `make team-server` sends
        process.wait(timeout=60)

    try:
        wait_until_serving(f"http://127.0.0.1:{port}/health", process, log, timeout_s=180)
        yield {"uri": f"http://127.0.0.1:{port}", "dir": team_dir, "log": log, "stop": stop, **secret}
    finally:
        stop()
        shutil.rmtree(team_dir, ignore_errors=True)


def test_team_server_prints_the_uri_to_export(locked):
    assert f"export MLFLOW_TRACKING_URI={locked['uri']}\n" in locked["log"].read_text()


def test_basic_auth_refuses_a_client_without_credentials(locked, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{locked['uri']}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
    assert refused.value.code == 401
    with pytest.raises(mlflow.exceptions.MlflowException, match="401|nauthorized|credentials"):
        mlflow.MlflowClient(locked["uri"]).search_experiments()


def test_basic_auth_lets_a_teammate_with_credentials_log_a_run(locked, monkeypatch):
    # The admin makes the teammate's account; passwords live in the environment only.
    from mlflow.server import get_app_client

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", locked["admin"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", locked["password"])
    get_app_client("basic-auth", tracking_uri=locked["uri"]).create_user("carol", "carols-own-secret-2")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "carol")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "carols-own-secret-2")
    client = mlflow.MlflowClient(locked["uri"])
    logged = client.create_run(client.create_experiment("carols-experiment"), run_name="carol-1")
    client.log_metric(logged.info.run_id, "accuracy", 0.9)
    client.set_terminated(logged.info.run_id)
    finished = client.get_run(logged.info.run_id)
    assert finished.info.status == "FINISHED" and finished.data.metrics["accuracy"] == 0.9
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(mlflow.exceptions.MlflowException, match="401|nauthorized|credentials"):
        client.get_run(logged.info.run_id)


def test_stopping_the_team_server_stops_postgres_with_it(locked):
    locked["stop"]()
    assert not (locked["dir"] / "pgdata/postmaster.pid").exists()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", int(locked["uri"].rsplit(":", 1)[1]))) != 0
