# diffprune: `make demo` runs the whole digits pipeline; `make test` runs the test suite.
# Both create .venv and install on first use (then skip installing in well under a second).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export MLFLOW_ENABLE_TELEMETRY := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 600
export HF_HUB_DISABLE_TELEMETRY := 1
export PYTHONUNBUFFERED := 1

PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
BENCHES := $(patsubst benchmarks/%.py,%,$(filter-out benchmarks/__init__.py benchmarks/common.py,$(wildcard benchmarks/*.py)))

.PHONY: setup demo test test-all bench ui ui-stop clean $(addprefix bench-,$(BENCHES))

$(INSTALLED): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

setup: $(INSTALLED)

demo: setup
	@git rev-parse --git-dir >/dev/null 2>&1 || git init -q
	@test -d .dvc || $(BIN)/dvc init -q
	@$(BIN)/dvc remote add --local -d -f local "$(CURDIR)/.dvc-remote" >/dev/null
	@mkdir -p .dvc-remote
	time $(BIN)/diffprune run

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ''

bench: $(addprefix bench-,$(BENCHES))

$(addprefix bench-,$(BENCHES)): bench-%: setup
	$(BIN)/python -m benchmarks.$*

ui: setup
	@mkdir -p .work
	@nohup $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) > .work/prefect-server.log 2>&1 &
	@nohup $(BIN)/mlflow ui --host 127.0.0.1 --port $(MLFLOW_PORT) --backend-store-uri sqlite:///$(CURDIR)/mlruns.db \
		--default-artifact-root $(CURDIR)/mlartifacts > .work/mlflow-ui.log 2>&1 &
	@echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)   (export PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api to run flows against it)"
	@echo "MLflow UI:  http://127.0.0.1:$(MLFLOW_PORT)"
	@echo "logs in .work/; stop both with: make ui-stop"

ui-stop:
	-pkill -f "prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)"
	-pkill -f "mlflow ui --host 127.0.0.1 --port $(MLFLOW_PORT)"

clean:
	rm -rf data/dataset data/*.json models/* .work mlruns.db mlartifacts
	@touch models/.gitkeep
