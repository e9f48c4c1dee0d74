"""What each stage did, written beside its outputs for the log stage to put into MLflow.

A stage never talks to the tracking store. Once its outputs are written it writes
`data/runs/<stage>.json`, a DVC output of its own: a new `record_id`, the metrics (with steps and
times), tags, artifacts (files the stage wrote, to upload), TensorBoard folders, child runs (the
head search's trials) and the model to log. The `log` stage, last in dvc.yaml, builds the
execution's one MLflow run from these files (`retrain.run_log.log_execution`). A stage DVC skips
keeps its record as it was, so the log step sees that an earlier run logged it already.
No MLflow here: importing it costs a stage 1.5-9 s.
"""

import contextlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from retrain import paths
from retrain.atomic import atomic_file

LOG_STAGE = "log"  # the stage that reads the records; data/runs/log.json is its own record of the run


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class StageRecord:
    """One stage's contribution to the execution's MLflow run."""

    stage: str
    metrics: dict[str, list] = field(default_factory=dict)  # key → [[step, value, timestamp ms], …]
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[list[str]] = field(default_factory=list)  # [local file or folder, artifact folder or ""]
    tensorboard: list[list[str]] = field(default_factory=list)  # [local folder, folder under logs/<run name>/]
    children: list[dict] = field(default_factory=list)  # {"name", "params", "metrics", "tags"}
    model: dict | None = None  # {"example": image path}: log model/ as the run's pyfunc model

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = _now_ms()
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append([step, float(value), now])

    def set_tags(self, tags: dict[str, object]) -> None:
        self.tags.update({key: str(value) for key, value in tags.items()})

    def log_artifacts(self, path: Path, artifact_path: str = "") -> None:
        """Upload a file or a folder's contents under artifact_path ("" = the run's top level)."""
        self.artifacts.append([str(path), artifact_path])

    def add_tensorboard(self, folder: Path, name: str) -> None:
        """TensorBoard event files: to logs/<run name>/<name>/ and the run's tensorboard/<name>/."""
        self.tensorboard.append([str(folder), name])

    def add_child(self, name: str, params: dict, metrics: dict[str, list[float]], tags: dict[str, object]) -> None:
        """A child run (`<run name>-<name>`): metrics are per-step lists."""
        now = _now_ms()
        self.children.append(
            {
                "name": name,
                "params": {key: str(value) for key, value in params.items()},
                "metrics": {
                    key: [[step, float(v), now] for step, v in enumerate(values)] for key, values in metrics.items()
                },
                "tags": {key: str(value) for key, value in tags.items()},
            }
        )

    def write(self, root: Path = Path(".")) -> Path:
        target = root / paths.RUNS_DIR / f"{self.stage}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        content = {"record_id": uuid.uuid4().hex, **asdict(self)}
        with atomic_file(target) as temp:
            temp.write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")
        return target


@contextlib.contextmanager
def stage_record(stage: str):
    """Yields the stage's record; written (atomically) only when the block succeeds."""
    record = StageRecord(stage)
    yield record
    record.set_tags({f"{stage}.process_seconds": round(time.time() - process_started(), 2)})  # where time goes
    record.write()


def process_started() -> float:
    """When this process started (epoch seconds): `<stage>.process_seconds` counts from it."""
    import psutil

    return psutil.Process(os.getpid()).create_time()


def read_record(stage: str, root: Path = Path("."), key: str = "record_id") -> dict | None:
    """data/runs/<stage>.json as a dict with a string `key` (log.json's is run_id), or None
    (missing, unreadable, or older)."""
    from retrain.small_files import read_capped_text

    try:
        record = json.loads(read_capped_text(root / paths.RUNS_DIR / f"{stage}.json", what="stage record"))
    except (FileNotFoundError, json.JSONDecodeError, RecursionError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get(key), str) else None
