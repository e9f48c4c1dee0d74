"""MLflow tracking: exactly one run per pipeline execution, whichever stages it runs.

An *execution* is one `dvc repro` / `dvc exp run` process (queued and `--temp` experiments each
run in a `dvc exp exec-run` process of their own). Every stage, once its work is done, calls
`stage_run(stage, params)`: it finds the run tagged with this execution's key (the host, pid and
start time of the nearest `dvc` process above the stage), or creates it, named after
`$DVC_EXP_NAME` when set, with all params, source tags and the dataset inputs. The stage logs its
metrics there, and writes `data/runs/<stage>.json`, a DVC output recording the run that produced
the stage's outputs and what it logged. A stage that DVC skips leaves its provenance file as it
was, so a later execution's run records `retrain.reused.<stage>` = the producing run's id and
copies that run's metrics and tags for the stage: every run compares completely against the
others, and no execution ever writes into an earlier run. An execution that runs nothing makes
no run.

The store defaults to `sqlite:///<repo root>/mlflow.db` with artifacts in `<repo root>/mlartifacts`;
`MLFLOW_TRACKING_URI` selects a server instead. The repo root is `$DVC_ROOT`, so temporary
experiment copies log to the workspace's store, and TensorBoard files go to `<repo root>/logs`.
MLflow is imported when a stage logs, after its work: a stage starts without it (`import mlflow`
costs 1.5-2 s even so, the next thing to cut: one logging step for the whole execution).
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
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from retrain import paths
from retrain.errors import RetrainError
from retrain.urls import redact_text, redact_url

# DVC runs them in this order (dvc.yaml's DAG, topologically sorted).
STAGES = ("download", "split", "bottlenecks", "data_report", "train", "finetune", "evaluate", "export")
EXPERIMENT_KIND = "custom_model_development"  # the MLflow UI's model-training view (not GenAI)

# A dead tracking server must fail a stage within seconds, not after MLflow's default 7 retries
# with exponential backoff (minutes). A user's own settings win.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a stage log is a file, not a terminal


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


def execution_key() -> str:
    """Who this pipeline execution is: the nearest `dvc` process above us (host:pid:start time).

    Every stage of one `dvc repro` or `dvc exp run` is a child of the same dvc process, and each
    queued experiment has its own `dvc exp exec-run`. A stage run by hand is its own execution;
    `$RETRAIN_EXECUTION` names one explicitly.
    """
    import psutil

    if os.environ.get("RETRAIN_EXECUTION"):  # a scheduler running stages without dvc names its execution
        return os.environ["RETRAIN_EXECUTION"]
    me = psutil.Process()
    for process in me.parents():
        try:
            command = process.cmdline()
        except psutil.Error:
            continue
        if any(Path(part).name == "dvc" for part in command[:2]) or command[1:3] == ["-m", "dvc"]:
            me = process
            break
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.3f}"


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

    A stage killed while it logs cannot end its run, which would then stay RUNNING forever in the
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


@dataclass
class StageRun:
    """The execution's run as one stage sees it; what it logs through here is its provenance."""

    stage: str
    run_id: str
    run_name: str
    experiment_id: str
    client: object
    metrics: dict[str, list] = field(default_factory=dict)  # key → [[step, value, timestamp ms], …]
    tags: dict[str, str] = field(default_factory=dict)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 500])
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append([step, float(value), now])

    def set_tags(self, tags: dict[str, object]) -> None:
        from mlflow.entities import RunTag

        clean = {key: str(value) for key, value in tags.items()}
        if clean:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in clean.items()])
        self.tags.update(clean)


def _find_or_create_run(client, experiment_id: str, key: str, params: dict):
    from mlflow.entities import Param, RunTag

    try:
        query = f"tags.`retrain.execution` = {filter_string(key)}"
    except ValueError:
        raise RetrainError(
            f"RETRAIN_EXECUTION {key!r}: holds both ' and \"; name the execution without quotes"
        ) from None
    found = client.search_runs([experiment_id], query, max_results=1)
    if found:
        return found[0]
    tags = {**source_tags(), "retrain.execution": key, "retrain.host": socket.gethostname()}
    run = client.create_run(experiment_id, run_name=os.environ.get("DVC_EXP_NAME") or None, tags=tags)
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    client.log_batch(run.info.run_id, tags=[RunTag("retrain.params_hash", _params_hash(params))])
    return run


def _params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_provenance(stage: str, root: Path = Path(".")) -> dict | None:
    """data/runs/<stage>.json: the run that produced the stage's current outputs, or None."""
    from retrain.small_files import read_capped_text

    try:
        record = json.loads(read_capped_text(root / paths.RUNS_DIR / f"{stage}.json", what="provenance file"))
    except (FileNotFoundError, json.JSONDecodeError, RecursionError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("run_id"), str) else None


def _record_reused(stage_run: StageRun, current: str, tags: dict[str, str]) -> None:
    """Tag every other stage whose outputs an earlier run produced; copy its logs if upstream."""
    from mlflow.entities import Metric, RunTag

    position = STAGES.index(current)
    for stage in STAGES:
        if stage == current or tags.get(f"retrain.ran.{stage}"):
            continue
        provenance = read_provenance(stage)
        if provenance is None or provenance["run_id"] == stage_run.run_id:
            continue
        if tags.get(f"retrain.reused.{stage}") == provenance["run_id"]:
            continue  # an earlier stage of this execution recorded it already
        stage_run.client.set_tag(stage_run.run_id, f"retrain.reused.{stage}", provenance["run_id"])
        if STAGES.index(stage) > position:
            continue  # may still run in this execution: only its metrics would be stale
        metrics = [
            Metric(key, value, timestamp, step)
            for key, history in provenance.get("metrics", {}).items()
            for step, value, timestamp in history
        ]
        copied = [RunTag(k, v) for k, v in provenance.get("tags", {}).items()]
        for i in range(0, max(len(metrics), len(copied)), 500):
            stage_run.client.log_batch(stage_run.run_id, metrics=metrics[i : i + 500], tags=copied[i : i + 500])


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


@contextlib.contextmanager
def stage_run(stage: str, params, log_datasets: bool | None = None):
    """The execution's run, for `stage` to log what it did once its outputs are written.

    Yields a `StageRun` that is also MLflow's active run (so `mlflow.log_artifacts` and
    `mlflow.pyfunc.log_model` go there). On success the run ends FINISHED and
    data/runs/<stage>.json records it; a failure ends it FAILED (KILLED on Ctrl-C). A tracking
    store that cannot be reached is one line naming it; the stage's outputs stay on disk.
    """
    import mlflow
    from mlflow.entities import RunStatus
    from mlflow.exceptions import MlflowException

    from retrain.params import flatten

    try:
        experiment_id = use_experiment(params.tracking.experiment)
        fail_stale_runs(experiment_id)
        client = mlflow.MlflowClient()
        run = _find_or_create_run(client, experiment_id, execution_key(), flatten(params))
    except (MlflowException, OSError) as error:
        raise _unreachable(error) from None
    run_id = run.info.run_id
    handle = StageRun(stage, run_id, run.info.run_name, experiment_id, client)
    mlflow.start_run(run_id=run_id)  # the active run, for mlflow.log_artifacts and log_model
    try:
        client.set_tag(run_id, "retrain.pid", str(os.getpid()))  # the live owner, spared by stale-run cleanup
        tags = run.data.tags
        if tags.get(f"retrain.reused.{stage}"):
            client.delete_tag(run_id, f"retrain.reused.{stage}")  # it ran after all
        client.set_tag(run_id, f"retrain.ran.{stage}", "true")
        _record_reused(handle, stage, tags)
        if log_datasets is None:
            log_datasets = STAGES.index(stage) > STAGES.index("split") and not run.inputs.dataset_inputs
        if log_datasets and paths.SPLIT_CSV.exists():
            log_dataset_inputs(paths.SPLIT_CSV, redact_url(params.data.url))
        yield handle
        handle.set_tags({f"{stage}.process_seconds": round(time.time() - _started(), 2)})  # where sweep time goes
        _write_provenance(handle, params.tracking.experiment)
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except MlflowException as error:
        _end_quietly(RunStatus.FAILED)
        raise _unreachable(error) from None
    except BaseException:
        _end_quietly(RunStatus.FAILED)
        raise
    mlflow.end_run()


def _started() -> float:
    import psutil

    return psutil.Process().create_time()


def _end_quietly(status) -> None:
    import mlflow
    from mlflow.entities import RunStatus

    with contextlib.suppress(Exception):  # the store may be the thing that failed
        mlflow.end_run(RunStatus.to_string(status))


def store_error(error: Exception) -> RetrainError:
    """An MLflow failure as one line naming the store (credentials removed)."""
    return _unreachable(error)


def _unreachable(error: Exception) -> RetrainError:
    message = redact_text(getattr(error, "message", None) or str(error)).strip() or type(error).__name__
    return RetrainError(
        f"MLflow tracking store {shown_uri()} failed ({message.splitlines()[0][:200]}); "
        "start it or unset MLFLOW_TRACKING_URI, then rerun `dvc repro`: finished outputs are kept"
    )


def _write_provenance(handle: StageRun, experiment: str) -> None:
    from retrain.atomic import atomic_file

    paths.RUNS_DIR.mkdir(parents=True, exist_ok=True)
    record = {
        "stage": handle.stage,
        "run_id": handle.run_id,
        "run_name": handle.run_name,
        "experiment": experiment,
        "tracking_uri": shown_uri(),
        "tags": handle.tags,
        "metrics": handle.metrics,
    }
    with atomic_file(paths.RUNS_DIR / f"{handle.stage}.json") as temp:
        temp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def find_run(target: str, experiment: str):
    """A run by DVC experiment name, MLflow run id, or "workspace" (the run behind model/)."""
    import mlflow

    experiment_id = use_experiment(experiment)
    client = mlflow.MlflowClient()
    if target == "workspace":
        provenance = read_provenance("export", project_root())
        if provenance is None:
            raise RetrainError(f"{paths.RUNS_DIR / 'export.json'}: not found; run `dvc repro` first")
        target = provenance["run_id"]
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
