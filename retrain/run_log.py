"""The log stage's job: one MLflow run per pipeline execution, built from the stages' records.

Every stage writes `data/runs/<stage>.json` (`retrain.records`) and no stage talks to MLflow. The
`log` stage, last in dvc.yaml and depending on every record, runs exactly when some stage ran, in
one process, and builds the execution's run:

- a record no finished run holds yet (tag `retrain.record.<stage>` = its id) is this execution's
  work: tag `retrain.ran.<stage>`, log its metrics, tags, artifacts, TensorBoard files, child runs
  and model;
- a record an earlier run logged is reused: tag `retrain.reused.<stage>` = that run's id and copy
  the record's metrics and tags, so every run compares completely against the others.

No earlier run is ever written to. An execution whose records are all logged already makes no run.
The run is named after `$DVC_EXP_NAME` (a DVC experiment) and carries every param, MLflow's source
tags and the splits as dataset inputs. If the store fails, the stage fails with one line naming
it, and the stages' work is kept: rerunning `dvc repro` reruns only this step, which first moves
its earlier, unfinished attempt (a FAILED or KILLED run holding the same records) to the trash.
"""

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

import yaml

from retrain import paths
from retrain.atomic import atomic_file
from retrain.records import LOG_STAGE, process_started, read_record
from retrain.tracking import (
    fail_stale_runs,
    filter_string,
    log_dataset_inputs,
    logs_dir,
    params_hash,
    shown_uri,
    source_tags,
    store_error,
    use_experiment,
)
from retrain.urls import redact_url

BATCH = 100  # MLflow's per-request limit for params and tags (metrics: 1000)


def pipeline_stages(root: Path = Path(".")) -> list[str]:
    """The stages in dvc.yaml's order, the log stage left out."""
    return [name for name in yaml.safe_load((root / "dvc.yaml").read_text())["stages"] if name != LOG_STAGE]


def log_execution(params, stages: list[str] | None = None) -> dict:
    """Log this execution's run from data/runs/*.json; data/runs/log.json records it. Returns that record."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    records = {s: r for s in (stages or pipeline_stages()) if (r := read_record(s)) is not None}
    try:
        experiment_id = use_experiment(params.tracking.experiment)
        client = mlflow.MlflowClient()
        fail_stale_runs(experiment_id)
        ran, reused = _sort_records(client, experiment_id, records)
        if not ran:
            return _write_log(None, params.tracking.experiment, ran, reused)
        run = create_run(client, experiment_id, params)
        _log_run(client, run, records, ran, reused, params)
    except (MlflowException, RequestException) as error:
        raise store_error(error) from None
    return _write_log(run, params.tracking.experiment, ran, reused)


def create_run(client, experiment_id: str, params):
    """A new RUNNING run for this execution, owned by this process (`retrain.pid`), params logged."""
    from retrain.params import flatten

    flat = flatten(params)
    tags = {
        **source_tags(),
        "retrain.host": socket.gethostname(),
        "retrain.pid": str(os.getpid()),  # the live owner, spared by stale-run cleanup
        "retrain.params_hash": params_hash(flat),
    }
    run = client.create_run(experiment_id, run_name=os.environ.get("DVC_EXP_NAME") or None, tags=tags)
    _log_params(client, run.info.run_id, flat)
    return run


def _log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(key, str(value)) for key, value in params.items()]
    for i in range(0, len(items), BATCH):
        client.log_batch(run_id, params=items[i : i + BATCH])


def _sort_records(client, experiment_id: str, records: dict) -> tuple[list[str], dict[str, str]]:
    """(stages this execution ran, {stage: id of the finished run that logged its record})."""
    ran, reused = [], {}
    for stage, record in records.items():
        query = f"tags.`retrain.record.{stage}` = {filter_string(record['record_id'])}"
        found = client.search_runs([experiment_id], query, max_results=100)
        finished = [r for r in found if r.info.status == "FINISHED"]
        if finished:
            reused[stage] = finished[0].info.run_id
            continue
        ran.append(stage)
        for attempt in found:  # an earlier try at logging this execution, cut short: logged anew below
            if attempt.info.status in ("FAILED", "KILLED"):
                client.delete_run(attempt.info.run_id)
    return ran, reused


def _log_run(client, run, records: dict, ran: list[str], reused: dict[str, str], params) -> None:
    import mlflow
    from mlflow.entities import RunStatus

    run_id = run.info.run_id
    mlflow.start_run(run_id=run_id)  # the active run, for log_artifacts, log_input and log_model
    try:
        for stage, record in records.items():
            if stage in reused:
                _copy_reused(client, run_id, stage, record, reused[stage])
            else:
                _log_stage(client, run, stage, record)
        if paths.SPLIT_CSV.exists():
            log_dataset_inputs(paths.SPLIT_CSV, redact_url(params.data.url))
        _set_tags(client, run_id, {f"{LOG_STAGE}.process_seconds": round(time.time() - process_started(), 2)})
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        with contextlib.suppress(Exception):  # the store may be the thing that failed
            mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow.end_run()


def _metrics(history: dict) -> list:
    from mlflow.entities import Metric

    return [Metric(key, value, timestamp, step) for key, steps in history.items() for step, value, timestamp in steps]


def _log_metrics(client, run_id: str, history: dict) -> None:
    metrics = _metrics(history)
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def _set_tags(client, run_id: str, tags: dict) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(key, str(value)) for key, value in tags.items()]
    for i in range(0, len(items), BATCH):
        client.log_batch(run_id, tags=items[i : i + BATCH])


def _copy_reused(client, run_id: str, stage: str, record: dict, producer: str) -> None:
    _set_tags(client, run_id, {**record.get("tags", {}), f"retrain.reused.{stage}": producer})
    _log_metrics(client, run_id, record.get("metrics", {}))


def _log_stage(client, run, stage: str, record: dict) -> None:
    import mlflow

    run_id = run.info.run_id
    _set_tags(client, run_id, {**record.get("tags", {}), f"retrain.ran.{stage}": "true"})
    _log_metrics(client, run_id, record.get("metrics", {}))
    for path, artifact_path in record.get("artifacts", []):
        if Path(path).is_dir():
            mlflow.log_artifacts(path, artifact_path=artifact_path or None)
        else:
            mlflow.log_artifact(path, artifact_path=artifact_path or None)
    for folder, name in record.get("tensorboard", []):
        # Beside the workspace's other runs for `tensorboard --logdir logs` (a queued experiment's copy is deleted).
        shutil.copytree(folder, logs_dir() / run.info.run_name / name, dirs_exist_ok=True)
        mlflow.log_artifacts(folder, artifact_path=f"tensorboard/{name}")
    for child in record.get("children", []):
        _log_child(client, run, child)
    if record.get("model"):
        model_uri = _log_model(record["model"]["example"])
        _set_tags(client, run_id, {"retrain.model_uri": model_uri})  # promote reads it
    # Last: a retry after a failure here finds no finished run holding this record, and logs it again.
    _set_tags(client, run_id, {f"retrain.record.{stage}": record["record_id"]})


def _log_child(client, run, child: dict) -> None:
    """A child run (a head-search trial) under the execution's run: the UI compares them side by side."""
    tags = {**child.get("tags", {}), "mlflow.parentRunId": run.info.run_id}
    created = client.create_run(run.info.experiment_id, run_name=f"{run.info.run_name}-{child['name']}", tags=tags)
    _log_params(client, created.info.run_id, child.get("params", {}))
    _log_metrics(client, created.info.run_id, child.get("metrics", {}))
    client.set_terminated(created.info.run_id)


def _log_model(example_image: str) -> str:
    """model/model.tflite as the run's MLflow pyfunc model, with its signature; returns its URI."""
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    from retrain.pyfunc import pyfunc_model

    example = pd.DataFrame({"image": [Path(example_image).read_bytes()]})
    # Given, not inferred: inferring it from the example loads and runs the model once more.
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(
            [
                ColSpec("string", "label"),
                ColSpec("double", "probability"),
                ColSpec(Array("string"), "top_k_labels"),
                ColSpec(Array("double"), "top_k_probabilities"),
            ]
        ),
    )
    info = mlflow.pyfunc.log_model(
        name="model", input_example=example, signature=signature, **pyfunc_model(paths.MODEL_DIR)
    )
    return info.model_uri


def _write_log(run, experiment: str, ran: list[str], reused: dict[str, str]) -> dict:
    """data/runs/log.json: the run that holds the workspace's results (promote's `workspace`)."""
    if run is None:  # nothing new: the run that logged the export holds these results
        run_id = reused.get("export") or next(iter(reused.values()), None)
        record = {"run_id": run_id, "run_name": None, "new_run": False}
    else:
        record = {"run_id": run.info.run_id, "run_name": run.info.run_name, "new_run": True}
    record.update({"experiment": experiment, "tracking_uri": shown_uri(), "ran": ran, "reused": reused})
    paths.RUNS_DIR.mkdir(parents=True, exist_ok=True)
    with atomic_file(paths.RUNS_DIR / f"{LOG_STAGE}.json") as temp:
        temp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record
