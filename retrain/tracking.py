"""Where MLflow runs live: the store, the experiment, source tags, dataset inputs, finding and promoting runs.

The store defaults to `sqlite:///<repo root>/mlflow.db` with artifacts in `<repo root>/mlartifacts`;
`MLFLOW_TRACKING_URI` selects a server instead. The repo root is `$DVC_ROOT`, so temporary
experiment copies log to the workspace's store, and TensorBoard files go to `<repo root>/logs`.
Only the log stage (`retrain.run_log`) and `retrain promote` import MLflow; the stages write records.
"""

import contextlib
import fcntl
import getpass
import hashlib
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

from retrain import paths
from retrain.errors import RetrainError
from retrain.urls import redact_text, redact_url

EXPERIMENT_KIND = "custom_model_development"  # the MLflow UI's model-training view (not GenAI)

# A dead tracking server must fail the log stage within seconds, not after MLflow's default 7
# retries with exponential backoff (minutes). A user's own settings win. Set before the first request.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a stage log is a file, not a terminal
}


def project_root() -> Path:
    """The workspace: DVC's parent repo for temporary experiment copies, else the current folder."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def logs_dir() -> Path:
    """TensorBoard's folder, in the workspace even for queued experiments (their copy is deleted)."""
    return project_root() / paths.LOGS_DIR


def _default_uri() -> str:
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or _default_uri()


def _is_default_store() -> bool:
    # Not "MLFLOW_TRACKING_URI is unset": mlflow.set_tracking_uri() exports it for child processes.
    return tracking_uri() == _default_uri()


@contextlib.contextmanager
def _store_lock():
    """Serialises first use of the default SQLite store across processes (`dvc queue start -j N`).

    MLflow's tracking store creates and migrates a new database's tables without a lock, so two
    workers opening a fresh mlflow.db at once fail ("duplicate column name"). The lock file lives in
    the project, in mlartifacts/ beside the store it guards (git-ignored, so never in `git status`),
    not in the shared temp folder, where another user could hold it or point it elsewhere.
    """
    if not _is_default_store():
        yield
        return
    folder = project_root() / "mlartifacts"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".mlflow.db.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, even if we crash
        database = project_root() / "mlflow.db"
        if not database.exists():  # the owner's alone: it holds params, tags and dataset sources
            os.close(os.open(database, os.O_CREAT | os.O_WRONLY, 0o600))
        yield


def shown_uri() -> str:
    """The tracking URI as it may be printed or stored: without a password or token."""
    return redact_url(tracking_uri())


def filter_string(value: str) -> str:
    """`value` as a quoted string literal of an MLflow search filter.

    MLflow's filter grammar has no escape inside a literal, so a value holding ' is quoted with ";
    one holding both quote characters cannot be searched for (ValueError).
    """
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} holds both quote characters")


def use_experiment(name: str) -> str:
    """Point MLflow at the store and experiment (created if missing, safely under parallel workers)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    mlflow.set_tracking_uri(tracking_uri())
    if shown_uri() != tracking_uri():  # MLflow prints "View run at <the URI as given>" into the stage log
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    with _store_lock():
        client = mlflow.MlflowClient()  # opening a new SQLite store creates its tables
        for _ in range(3):
            experiment = client.get_experiment_by_name(name)
            if experiment is not None:
                if experiment.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND:
                    client.set_experiment_tag(experiment.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)
                return experiment.experiment_id
            location = (project_root() / "mlartifacts").as_uri() if _is_default_store() else None
            try:
                return client.create_experiment(
                    name, artifact_location=location, tags={"mlflow.experimentKind": EXPERIMENT_KIND}
                )
            except MlflowException:
                continue  # on a server, another worker created it between our look and our create
    raise RetrainError(f"MLflow experiment '{name}' could not be created in {shown_uri()}")


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10, cwd=project_root())
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags, which the UI shows as the run's Source and git commit."""
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD")
    tags = {
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": "dvc exp run" if os.environ.get("DVC_EXP_NAME") else "dvc repro",
        "mlflow.user": _user(),
        "mlflow.source.git.commit": commit or "unknown",
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
    }
    branch = _git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    remote = _git("remote", "get-url", "origin")
    if remote:
        tags["mlflow.source.git.repoURL"] = redact_url(remote)  # https://user:token@… is common
    return tags


def fail_stale_runs(experiment_id: str) -> list[str]:
    """Mark this host's RUNNING runs whose logging process is gone as FAILED; return their ids.

    A log stage killed while it logs cannot end its run, which would then stay RUNNING forever in the
    MLflow UI. Runs record `retrain.pid` and `retrain.host`; a run of another host, or whose
    process still lives, is left alone.
    """
    import mlflow
    from mlflow.entities import RunStatus

    client = mlflow.MlflowClient()
    host = socket.gethostname()
    stale = []
    try:
        query = f"attributes.status = 'RUNNING' and tags.`retrain.host` = {filter_string(host)}"
    except ValueError:
        return []  # a host name no filter can hold: leave stale runs to the UI
    for run in client.search_runs([experiment_id], query, max_results=1000):
        pid = run.data.tags.get("retrain.pid", "")
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            client.set_tag(run.info.run_id, "retrain.failure", f"process {pid} ended without closing the run (killed?)")
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
            print(
                f"MLflow run {run.info.run_id} was left RUNNING by process {pid}, which is gone: marked FAILED",
                file=sys.stderr,
            )
            stale.append(run.info.run_id)
    return stale


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def log_dataset_inputs(split_csv: Path, source: str) -> None:
    """Each split as an MLflow dataset input (name, digest, source, class counts), once per run."""
    import mlflow
    import pandas as pd

    frame = pd.read_csv(split_csv)
    for split in ("train", "validation", "test"):
        rows = frame[frame["split"] == split].sort_values("path")
        digest = hashlib.sha256(
            "".join(f"{p}\t{label}\t{s}\n" for p, label, s in zip(rows["path"], rows["label"], rows["sha256"])).encode()
        ).hexdigest()
        with warnings.catch_warnings():  # MLflow registers its local-path source twice, then warns it is ambiguous
            warnings.filterwarnings(
                "ignore", message=".*multiple ways: LocalArtifactDatasetSource, LocalArtifactDatasetSource"
            )
            dataset = mlflow.data.from_pandas(
                rows[["path", "label", "sha256"]].reset_index(drop=True), source=source, name=split, digest=digest[:32]
            )
        counts = {f"class.{label}": str(n) for label, n in rows["label"].value_counts().sort_index().items()}
        mlflow.log_input(
            dataset,
            context={"train": "training", "validation": "validation", "test": "testing"}[split],
            tags={"images": str(len(rows)), "sha256": digest, **counts},
        )


def store_error(error: Exception) -> RetrainError:
    """An MLflow failure as one line naming the store (credentials removed)."""
    return _unreachable(error)


def _unreachable(error: Exception) -> RetrainError:
    message = redact_text(getattr(error, "message", None) or str(error)).strip() or type(error).__name__
    return RetrainError(
        f"MLflow tracking store {shown_uri()} failed ({message.splitlines()[0][:200]}); "
        "start it or unset MLFLOW_TRACKING_URI, then rerun `dvc repro`: finished outputs are kept"
    )


def logged_run_id(root: Path) -> str:
    """The MLflow run that holds the workspace's results: data/runs/log.json, the log stage's record."""
    from retrain.records import LOG_STAGE, read_record

    record = read_record(LOG_STAGE, root, key="run_id")
    if record is None:
        raise RetrainError(f"{paths.RUNS_DIR / 'log.json'}: no logged run; run `dvc repro` first")
    return record["run_id"]


def find_run(target: str, experiment: str):
    """A run by DVC experiment name, MLflow run id, or "workspace" (the run behind model/)."""
    import mlflow

    experiment_id = use_experiment(experiment)
    client = mlflow.MlflowClient()
    if target == "workspace":
        target = logged_run_id(project_root())
    if len(target) == 32 and all(c in "0123456789abcdef" for c in target):
        return client.get_run(target)
    try:
        found = client.search_runs(
            [experiment_id],
            f"attributes.run_name = {filter_string(target)}",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    except ValueError:
        found = []  # both quote characters: no DVC experiment is named so
    if not found:
        raise RetrainError(
            f"no MLflow run named {target!r} in experiment '{experiment}' at {shown_uri()}; "
            "give a DVC experiment name (`dvc exp show`), a run id, or `workspace`"
        )
    return found[0]


def promote(target: str, alias: str, registered_name: str, experiment: str) -> tuple[str, str]:
    """Register the model of `target`'s run as a new version of `registered_name` with `alias`."""
    import mlflow

    run = find_run(target, experiment)
    tags = run.data.tags
    model_uri = tags.get("retrain.model_uri")
    if not model_uri and tags.get("retrain.reused.export"):  # this execution reused an earlier export
        model_uri = mlflow.MlflowClient().get_run(tags["retrain.reused.export"]).data.tags.get("retrain.model_uri")
    if not model_uri:
        raise RetrainError(
            f"MLflow run {run.info.run_id} ({run.info.run_name}) logged no model; "
            "its export stage did not run or failed"
        )
    version = mlflow.register_model(model_uri, registered_name, tags={"retrain.run_id": run.info.run_id})
    mlflow.MlflowClient().set_registered_model_alias(registered_name, alias, version.version)
    return run.info.run_name, version.version
