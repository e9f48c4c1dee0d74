"""log: this execution's one MLflow run, built from the records the stages wrote (data/runs/*.json).

The only stage that talks to the tracking store. If the store is down, this stage fails with one
line and every other stage's work is kept: `dvc repro` then reruns only this step.
"""

from retrain.errors import exit_on_error
from retrain.params import load_params
from retrain.run_log import log_execution


def log():
    logged = log_execution(load_params())
    if not logged["new_run"]:
        print(f"every stage's record is logged already (run {logged['run_id']}): no new MLflow run")
        return
    reused = f"; reused {', '.join(logged['reused'])}" if logged["reused"] else ""
    print(
        f"MLflow run {logged['run_id']} ({logged['run_name']}) in {logged['tracking_uri']}: "
        f"ran {', '.join(logged['ran'])}{reused}"
    )
    if "export" in logged["ran"]:
        print(f"register its model with `retrain promote {logged['run_name']} --alias champion`")


if __name__ == "__main__":
    exit_on_error(log)
