# `make run` sets up and runs the pipeline; `make test` sets up and runs the tests.
# Both create .venv and install the pinned requirements first. `make help` lists the targets.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin
DATA ?=

.PHONY: help venv run test test-fast bench mlflow-ui team-server clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

venv: $(VENV)/.installed  ## create .venv with the pinned dependencies

# --no-deps: requirements.txt is the complete, pinned set (see pyproject.toml for why).
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==25.3"
	$(BIN)/python -m pip install --quiet --no-deps -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

run: venv  ## run the pipeline (dvc repro); DATA=/path/to/flower_photos.tgz or a folder to work offline
ifeq ($(DATA),)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
else
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc exp run -S 'data.url=$(DATA)' -S 'data.sha256=null'
endif

test: venv  ## run the whole test suite
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest

test-fast: venv  ## the tests without the end-to-end pipeline runs
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "not slow"

bench: venv  ## measure speed and memory (benchmarks/), print a table, save JSON
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python benchmarks/run.py

mlflow-ui: venv  ## open the MLflow UI on the default store, in its model-training view
	@echo "MLflow UI: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --port 5000

team-server: venv  ## PostgreSQL + MLflow server for a team (TEAM_DIR, HOST, PORT, AUTH=1); prints the URI to export
	MLFLOW="$(abspath $(BIN))/mlflow" scripts/team_server.sh

clean:  ## remove the venv (the feature cache in ~/.cache/retrain stays)
	rm -rf $(VENV)
