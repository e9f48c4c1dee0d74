# `make run` sets up and runs the pipeline; `make test` sets up and runs the tests.
# Both create .venv and install the pinned requirements first. `make help` lists the targets.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin
DATA ?=
# Opt-in parts, each pinned in requirements-<extra>.txt: dev (tests, lint), ray (bottlenecks.engine: ray),
# team (make team-server's PostgreSQL driver and basic auth), lite (efficientnet_lite1/2). GPU=1: the CUDA
# build of the same TensorFlow. `make test` and `make lint` add what they need.
EXTRAS ?=
GPU ?=
export VENV PYTHON GPU

.PHONY: help venv run test test-fast lint check-deps bench mlflow-ui team-server clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

venv:  ## create .venv with the pinned default set; EXTRAS="ray team lite dev" adds extras, GPU=1 CUDA TensorFlow
	@EXTRAS="$(EXTRAS)" scripts/venv.sh

run: venv  ## run the pipeline (dvc repro); DATA=/path/to/flower_photos.tgz or a folder to work offline
ifneq ($(DATA),)
	$(BIN)/python scripts/set_params.py 'data.url=$(DATA)' data.sha256=null
endif
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

# The tests cover every extra, so they install them all (CI runs exactly this).
test test-fast: override EXTRAS += dev ray team lite
lint check-deps: override EXTRAS += dev
team-server: override EXTRAS += team

test: venv  ## run the whole test suite (installs every extra)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest

test-fast: venv  ## the tests without the end-to-end pipeline runs
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "not slow"

lint: venv  ## ruff: lint and formatting check (ruff format fixes the formatting)
	$(BIN)/ruff check
	$(BIN)/ruff format --check

check-deps: venv  ## pyproject.toml declares every package the code imports (deptry); pip check on the venv
	$(BIN)/deptry .
	@# tensorflow-cpu provides the `tensorflow` that tf-keras asks for under another name: pip cannot know.
	@$(BIN)/python -m pip check | grep -vx 'tf-keras 2.21.0 requires tensorflow, which is not installed.' \
		| { ! grep . ; } && echo "pip check: no broken requirements"

bench: venv  ## measure speed and memory (benchmarks/), print a table, save JSON
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python benchmarks/run.py

mlflow-ui: venv  ## open the MLflow UI on the default store, in its model-training view
	@echo "MLflow UI: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --port 5000

team-server: venv  ## PostgreSQL + MLflow server for a team (TEAM_DIR, HOST, PORT, AUTH=1); prints the URI to export
	MLFLOW="$(abspath $(BIN))/mlflow" scripts/team_server.sh

clean:  ## remove the venv (the feature cache in ~/.cache/retrain stays)
	rm -rf $(VENV)
