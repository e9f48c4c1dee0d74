"""MLflow tracking: one run per pipeline execution, shared by train, evaluate and export.

The store defaults to `sqlite:///<repo root>/mlflow.db` with artifacts in `<repo root>/mlartifacts`;
`MLFLOW_TRACKING_URI` selects a server instead. The repo root is `$DVC_ROOT` when DVC sets it, so
`dvc exp run --temp/--queue`, which run in a temporary copy, log to the workspace's store. Train
creates the run (named after `$DVC_EXP_NAME` when set) and writes its id to a train output;
evaluate and export resume it.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import keras
import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from retrain.errors import RetrainError


def project_root() -> Path:
    """The workspace: DVC's parent repo for temporary experiment copies, else the current folder."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


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
    the temp folder, not beside mlflow.db, so it never shows up in `git status`.
    """
    if not _is_default_store():
        yield
        return
    digest = hashlib.sha256(tracking_uri().encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"retrain-mlflow-{digest}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, even if we crash
        yield


def use_experiment(name: str) -> str:
    """Point MLflow at the store and experiment (created if missing, safely under parallel workers)."""
    mlflow.set_tracking_uri(tracking_uri())
    with _store_lock():
        client = mlflow.MlflowClient()  # opening a new SQLite store creates its tables
        for _ in range(3):
            experiment = client.get_experiment_by_name(name)
            if experiment is not None:
                return experiment.experiment_id
            location = (project_root() / "mlartifacts").as_uri() if _is_default_store() else None
            try:
                return client.create_experiment(name, artifact_location=location)
            except MlflowException:
                continue  # on a server, another worker created it between our look and our create
    raise RetrainError(f"MLflow experiment '{name}' could not be created in {tracking_uri()}")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def fail_stale_runs(experiment_id: str) -> list[str]:
    """Mark this host's RUNNING runs whose creating process is gone as FAILED; return their ids.

    A SIGKILLed (or OOM-killed) train or evaluate cannot end its run, which would then stay
    RUNNING forever in the MLflow UI. Runs record `retrain.pid` and `retrain.host` when created;
    a run of another host, or whose process still lives, is left alone.
    """
    client = mlflow.MlflowClient()
    host = socket.gethostname()
    stale = []
    query = f"attributes.status = 'RUNNING' and tags.`retrain.host` = '{host}'"
    for run in client.search_runs([experiment_id], query, max_results=1000):
        pid = run.data.tags.get("retrain.pid", "")
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            client.set_tag(run.info.run_id, "retrain.failure", f"process {pid} ended without closing the run (killed?)")
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
            print(f"MLflow run {run.info.run_id} was left RUNNING by process {pid}, which is gone: marked FAILED",
                  file=sys.stderr)
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


def start_run(experiment: str, params: dict, tags: dict, run_file: Path) -> str:
    """Create this pipeline execution's run, log params and tags, record its id in run_file."""
    experiment_id = use_experiment(experiment)
    fail_stale_runs(experiment_id)
    run_name = os.environ.get("DVC_EXP_NAME") or None
    all_tags = {"git_commit": _git_commit(), "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""), **tags,
                "retrain.pid": str(os.getpid()), "retrain.host": socket.gethostname()}
    run = mlflow.MlflowClient().create_run(experiment_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    client = mlflow.MlflowClient()
    items = [mlflow.entities.Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    run_file.parent.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"run_id": run_id, "run_name": run.info.run_name, "experiment": experiment}) + "\n")
    return run_id


def read_run(run_file: Path) -> dict:
    try:
        return json.loads(Path(run_file).read_text())
    except FileNotFoundError:
        raise RetrainError(f"{run_file}: not found; run the train stage first") from None


@contextlib.contextmanager
def resumed_run(run_file: Path):
    """Reopen the pipeline's run; it ends FINISHED, or FAILED (KILLED on Ctrl-C) if the stage fails."""
    info = read_run(run_file)
    use_experiment(info["experiment"])
    try:
        run = mlflow.start_run(run_id=info["run_id"])
    except MlflowException as error:
        raise RetrainError(f"{run_file}: MLflow run {info['run_id']} not found in {tracking_uri()} ({error.message})") from None
    mlflow.set_tag("retrain.pid", str(os.getpid()))  # the live owner, so stale-run cleanup spares it
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow.end_run()


class EpochLogger(keras.callbacks.Callback):
    """Per-epoch train/validation loss and accuracy to the active MLflow run, with `step`."""

    def on_epoch_end(self, epoch, logs=None):
        names = {"loss": "train_loss", "accuracy": "train_accuracy", "val_loss": "val_loss", "val_accuracy": "val_accuracy"}
        metrics = {names[k]: float(v) for k, v in (logs or {}).items() if k in names}
        mlflow.log_metrics(metrics, step=epoch)


def log_misclassified_images(log_dir: Path, misclassified: list, limit: int = 8, size: int = 160) -> int:
    """A few of the worst misclassified test images into TensorBoard, captioned true → predicted."""
    import tensorflow as tf

    from retrain.images import decode_image

    shown = 0
    with tf.summary.create_file_writer(str(Path(log_dir) / "test")).as_default():
        for step, miss in enumerate(misclassified[:limit]):
            try:
                image = decode_image(tf.io.read_file(miss.path))
            except (tf.errors.OpError, ValueError):
                continue
            image = tf.image.resize(tf.image.convert_image_dtype(image, tf.float32), (size, size), preserve_aspect_ratio=True)
            name = f"misclassified/{miss.true_label} as {miss.predicted_label} ({miss.confidence:.2f})"
            tf.summary.image(name, image[tf.newaxis], step=step)
            shown += 1
    return shown
