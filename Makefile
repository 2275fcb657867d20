# Three commands for a newcomer: `make pipeline`, `make test` (fast, every commit), `make test-all` (everything: CI).
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

.PHONY: env hooks pipeline experiment report pr-comment pull push lint serve test test-all fuzz lab export bench lock docs docs-serve browser help retrain replay fremtpl2-frequency fremtpl2-pure-premium stack-up stack-down stack-destroy remote

help:
	@echo "make pipeline  - run the whole DVC pipeline (dvc repro) on the embedded default, with a summary table"
	@echo "make experiment SET='train.learning_rate=0.05' - the pipeline as a DVC experiment (dvc exp run -S ...)"
	@echo "make report    - what this change does to the model, against AGAINST (default main): reports/change.md"
	@echo "make hooks     - git hooks: pre-commit (nbdev-clean, export sync, ruff, stages check, ...) and the notebook merge driver"
	@echo "make lint      - every pre-commit hook on every file (offline)"
	@echo "make serve     - serve the registry's champion (host/port from settings.ini; after make pipeline)"
	@echo "make test      - the fast tier: notebooks in sync and clean, contracts, nbdev-test, unit tests, one small pipeline"
	@echo "make test-all  - everything (what CI runs): the fast tier, then the slow end-to-end tests"
	@echo "make fuzz      - search for new damaged CSVs that break ingest/validate (not part of the tiers)"
	@echo "make lab       - JupyterLab with the project's kernel (notebooks cleaned on save; git hooks installed)"
	@echo "make export    - nbdev-export + nbdev-clean after editing notebooks"
	@echo "make bench     - run every benchmark under benchmarks/"
	@echo "make lock      - re-pin requirements.lock after changing pyproject.toml"
	@echo "make docs      - build the documentation site into _docs/ (after make pipeline: it shows the latest run)"
	@echo "make docs-serve - build it and serve it on http://127.0.0.1:$(DOCS_PORT)"
	@echo "make retrain   - monitor data/incoming; re-train and gate when monitor.retrain says so"
	@echo "make replay    - replay months of drifting claims: monitor, re-train, gate (reports/replay/)"
	@echo "make stack-up  - the local team stack on 127.0.0.1 (PostgreSQL + MLflow server with auth, SeaweedFS S3, Dask with TLS), or what of it is not running (docs/team-setup.md)"
	@echo "make stack-down - stop every process it started (by process group); its data stays"
	@echo "make stack-destroy - stop it and wipe its data (runs, registry, objects, users, secrets)"
	@echo "make remote    - make settings.ini's dvc_remote DVC's default remote (then dvc push / dvc pull)"
	@echo "make fremtpl2-frequency / fremtpl2-pure-premium - the pipeline on the real freMTPL2 data (replaces params.yaml)"

env: $(STAMP)

# `uv pip sync`, not install: the venv holds exactly what the lock says, nothing left over from earlier installs.
# --compile-bytecode: these machines set PYTHONDONTWRITEBYTECODE=1, so without it every import compiles from source.
$(STAMP): requirements.lock pyproject.toml
	@echo "== installing the locked dependencies into $(VENV) (a few minutes the first time; then only when the lock changes)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet --disable-pip-version-check uv==0.13.8
	$(BIN)/uv pip sync --quiet --compile-bytecode --python $(BIN)/python requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (mlops-notebooks)" >/dev/null
	@touch $(STAMP)

# `dvc repro` with DVC's own output, each stage's start/still-running/end lines, and a table of the stages at the end.
pipeline: $(STAMP)
	$(BIN)/mlops-notebooks repro

# The pipeline as a DVC experiment, e.g. make experiment SET="train.learning_rate=0.05 train.max_iter=300": DVC names
# it (and so does its MLflow run); an experiment never moves @champion (register.promote_from). Compare with
# `.venv/bin/dvc exp show --only-changed`.
SET ?=
experiment: $(STAMP)
	$(BIN)/mlops-notebooks repro --exp $(foreach value,$(SET),-S $(value))

# What a change does to the model, against a git ref: params, metrics with deltas, the gate, the monitor, the plots.
AGAINST ?= main
report: $(STAMP)
	$(BIN)/mlops-notebooks report --against $(AGAINST) --output reports/change.md

# CI on a pull request: the report as a comment (the gh CLI, with GH_TOKEN in the environment).
pr-comment:
	gh pr comment --edit-last --body-file reports/change.md || gh pr comment --body-file reports/change.md

# The DVC remote (settings.ini dvc_remote; credentials from the environment).
pull: $(STAMP)
	$(BIN)/dvc pull --allow-missing

push: $(STAMP)
	$(BIN)/dvc push

# Git hooks from the venv (offline): pre-commit's (.pre-commit-config.yaml) and the notebook merge and diff drivers
# (.gitconfig, .gitattributes: a conflict in a notebook is resolved cell by cell by nbdev-merge).
hooks: $(STAMP)
	git config --local include.path ../.gitconfig
	$(BIN)/pre-commit install --install-hooks >/dev/null
	@echo "git hooks installed: pre-commit runs .pre-commit-config.yaml; notebooks merge cell by cell"

lint: $(STAMP)
	$(BIN)/pre-commit run --all-files

serve: $(STAMP)
	$(BIN)/mlops-notebooks serve

# The fast tier, for every commit: notebooks and modules in sync and committed clean, dvc.yaml and the params files
# checked against the contracts, the import floors, nbdev-test (the notebooks' examples), the unit tests and one
# small end-to-end `dvc repro` (re-runs, the run cache, a failed stage).
test: $(STAMP)
	$(BIN)/pytest -q tests/test_sync.py
	$(BIN)/nbdev-test --n-workers 2
	$(BIN)/pytest -q -m "not slow" tests --ignore=tests/test_sync.py

# Everything (what .ci/run calls): the fast tier, then the slow tests. The docs test loads every page in headless
# Chromium, so it needs it (installed here when missing); the freMTPL2 tests read ../shared/data/freMTPL2.
test-all: test browser
	$(BIN)/pytest -q -m slow tests

# A random search for damaged CSVs the fuzz test has not seen (the tiers replay a fixed set of cases).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=search $(BIN)/pytest -q tests/test_fuzz_csv.py

export: $(STAMP)
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean

# JupyterLab on nbs/ with the project's kernel; each notebook is cleaned by nbdev as it is saved (so saving one does not
# dirty it for git or make test; nbdev's hook reads the path it is given from the working directory, hence `cd nbs`);
# kernels get CurveZMQ keys; --allow-root in a container, where you are root.
lab: $(STAMP) hooks
	cd nbs && $(CURDIR)/$(BIN)/jupyter lab --FileContentsManager.pre_save_hook=nbdev.clean.clean_jupyter \
	  --MappingKernelManager.default_kernel_name=python3 --MappingKernelManager.transport_encryption=auto \
	  $(if $(filter 0,$(shell id -u)),--allow-root)

bench: $(STAMP)
	@for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done
	$(BIN)/python benchmarks/support/page.py

# The template on real data: freMTPL2 from ../shared, declared by a complete params file under examples/fremtpl2/.
# It replaces params.yaml (refusing when that has uncommitted edits of your own) and uses its own registered model
# and experiment, so the synthetic champion is not compared with a model of other data.
FREMTPL2 ?= ../shared/data/freMTPL2
fremtpl2-frequency fremtpl2-pure-premium: $(STAMP)
	@git diff --quiet HEAD -- params.yaml || { for example in examples/fremtpl2/*.yaml; do cmp -s params.yaml $$example && exit 0; done; \
	  echo "params.yaml has uncommitted edits; commit or stash them first (this target replaces it)" >&2; exit 2; }
	mkdir -p data/sources
	cp $(FREMTPL2)/freMTPL2freq.csv $(FREMTPL2)/freMTPL2sev.csv data/sources/
	cp examples/fremtpl2/$(patsubst fremtpl2_%,%,$(subst -,_,$@)).yaml params.yaml
	MLOPS_REGISTERED_MODEL_NAME=$@ MLOPS_EXPERIMENT_NAME=$@ $(BIN)/mlops-notebooks repro

# The loop on the real project: the monitor judges data/incoming with the current champion (--single-item: it does
# not first re-train on the batch it judges); a DVC stage cannot skip its downstream, so the retrain policy
# (monitor.retrain) is applied here, from the verdict's `retrain` field: `dvc repro register` re-runs from ingest
# (labelled incoming files join the claims) through train, evaluate and the registry gate. Under on_drift the
# monitor defers re-training while the flagged months would only be the gate's test months (see nbs/11_monitor).
retrain: $(STAMP)
	$(BIN)/mlops-notebooks repro --single-item monitor
	@if $(BIN)/python -c "import json, sys; sys.exit(0 if json.load(open('reports/monitor_verdict.json'))['retrain'] else 1)"; \
	then $(BIN)/mlops-notebooks repro register; else $(BIN)/python -c "import json; v = json.load(open('reports/monitor_verdict.json')); \
	print('no re-training after this verdict (' + v['verdict'] + '): ' + v.get('retrain_deferred', 'monitor.retrain is ' + v['retrain_policy']))"; fi

# Months of generated claims with drift (the `replay` section of params.yaml): reports/replay/.
replay: $(STAMP)
	$(BIN)/python -m mlops_notebooks.tools.replay

# Regenerate the lock file after changing dependencies in pyproject.toml.
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 --override lock-overrides.txt -o requirements.lock

# The documentation site: pages from the notebooks, docs/*.md, the latest run's reports/ and the registry (MkDocs Material).
DOCS_PORT ?= 8001
docs: $(STAMP)
	$(BIN)/python -m mlops_notebooks.tools.docs

docs-serve: docs
	$(BIN)/python -m http.server --bind 127.0.0.1 --directory _docs $(DOCS_PORT)

# Debian's chromium, for the docs' browser test. apt-get needs root: sudo when not root.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }
	@command -v chromium >/dev/null || { echo "chromium is missing and could not be installed"; exit 1; }

# The shared team setup rehearsed on one machine (docs/team-setup.md): needs MLFLOW_TRACKING_USERNAME,
# MLFLOW_TRACKING_PASSWORD, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment; state (data, logs, the
# stack's own secrets, mode 0600) in .team-stack/. stack-up after a crash restarts what is not running, on the same data.
stack-up: $(STAMP)
	$(BIN)/mlops-notebooks stack up

stack-down: $(STAMP)
	$(BIN)/mlops-notebooks stack down

stack-destroy: $(STAMP)
	$(BIN)/mlops-notebooks stack destroy

remote: $(STAMP)
	$(BIN)/mlops-notebooks remote
