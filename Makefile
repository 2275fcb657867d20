# Two commands for a newcomer: `make pipeline` and `make test`.
# Each creates .venv from the committed lock file when it is missing or stale.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
# Keep MLflow/DVC/Jupyter quiet and local.
export DVC_NO_ANALYTICS := 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export PYDEVD_DISABLE_FILE_VALIDATION := 1
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: env pipeline serve test lab export bench lock help

help:
	@echo "make pipeline  - run the whole DVC pipeline (dvc repro) on the embedded default"
	@echo "make serve     - serve the registry's champion (host/port from settings.ini; after make pipeline)"
	@echo "make test      - export check, clean check, nbdev-test, pytest"
	@echo "make lab       - JupyterLab with the project's kernel"
	@echo "make export    - nbdev-export + nbdev-clean after editing notebooks"
	@echo "make bench     - run every benchmark under benchmarks/"
	@echo "make lock      - re-pin requirements.lock after changing pyproject.toml"

env: $(STAMP)

# `uv pip sync`, not install: the venv holds exactly what the lock says, nothing left over from earlier installs.
# --compile-bytecode: these machines set PYTHONDONTWRITEBYTECODE=1, so without it every import compiles from source.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet --disable-pip-version-check uv==0.13.8
	$(BIN)/uv pip sync --quiet --compile-bytecode --python $(BIN)/python requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (mlops-notebooks)" >/dev/null
	@touch $(STAMP)

pipeline: $(STAMP)
	$(BIN)/dvc repro

serve: $(STAMP)
	$(BIN)/mlops-notebooks serve

test: $(STAMP)
	$(BIN)/pytest -q tests/test_sync.py
	$(BIN)/nbdev-test --n-workers 2
	$(BIN)/pytest -q tests --ignore=tests/test_sync.py

export: $(STAMP)
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean

lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=nbs

bench: $(STAMP)
	@for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

# Regenerate the lock file after changing dependencies in pyproject.toml.
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 --override lock-overrides.txt -o requirements.lock
