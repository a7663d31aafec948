# diffprune: `make demo` runs the whole digits pipeline; `make test` runs the test suite.
# Both create .venv and install on first use (then skip installing in well under a second).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

# telemetry off etc.: diffprune/env.py holds the defaults; QUIET runs a command with them set
QUIET := $(BIN)/python -m diffprune.env
# pytest-xdist workers for `make test` (a test module's tests stay in one worker: they share its fixtures)
TEST_WORKERS ?= 2
export PYTHONUNBUFFERED := 1

# the demo's workspace (`diffprune init`): its own git + DVC repository, outside this checkout's history
DEMO ?= runs/demo
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
BENCHES := $(patsubst benchmarks/%.py,%,$(filter-out benchmarks/__init__.py benchmarks/common.py benchmarks/tables.py,$(wildcard benchmarks/*.py)))

.PHONY: setup demo test test-all bench ui ui-stop clean $(addprefix bench-,$(BENCHES))

$(INSTALLED): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

setup: $(INSTALLED)

demo: setup
	@test -d $(DEMO)/.dvc || (mkdir -p $(dir $(DEMO)) && $(BIN)/diffprune init $(DEMO) --data digits)
	cd $(DEMO) && time $(CURDIR)/$(BIN)/python -m diffprune.env $(CURDIR)/$(BIN)/diffprune run

test: setup
	$(QUIET) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-all: setup
	$(QUIET) $(BIN)/python -m pytest -q -m ''

bench: $(addprefix bench-,$(BENCHES))

$(addprefix bench-,$(BENCHES)): bench-%: setup
	$(QUIET) $(BIN)/python -m benchmarks.$*

# the servers are recorded by process id (.work/NAME.pid; logs .work/NAME.log): ui-stop stops exactly those
SERVERS := $(BIN)/python -m diffprune.servers

ui: setup
	@$(SERVERS) start .work prefect-server -- $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)
	@$(SERVERS) start .work mlflow-ui -- $(BIN)/mlflow ui --host 127.0.0.1 --port $(MLFLOW_PORT) \
		--backend-store-uri sqlite:///$(CURDIR)/$(DEMO)/mlruns.db --default-artifact-root $(CURDIR)/$(DEMO)/mlartifacts
	@# the `gpu` concurrency limit CUDA stages take a slot of (orchestration.gpu_slots), once the server answers
	@PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/diffprune slots --root $(DEMO) --wait 120
	@echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)   (export PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api to run flows against it)"
	@echo "MLflow UI:  http://127.0.0.1:$(MLFLOW_PORT)"
	@echo "logs in .work/; stop both with: make ui-stop"

ui-stop:
	@if test -x $(BIN)/python; then $(SERVERS) stop .work prefect-server mlflow-ui; else echo "no $(BIN): nothing was started"; fi

clean: ui-stop  # first: .work/ holds the records of the servers make ui started
	rm -rf $(DEMO) data/dataset data/*.json models/* .work mlruns.db mlartifacts
	@touch models/.gitkeep
