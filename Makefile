# Every target that needs Python depends on the virtual environment: a fresh clone needs nothing else.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON_BASE ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STUDY ?= studies/cifar2.toml
TRIALS ?=
EPOCHS ?=
PORT ?= 5000
N ?= 4
CRON ?= 0 3 * * *
OVERRIDES := $(if $(TRIALS),--trials $(TRIALS)) $(if $(EPOCHS),--epochs $(EPOCHS))

.PHONY: help venv demo study workers report gradcheck ui test lint clean

help: ## show this help
	@grep -hE '^[a-z][a-zA-Z_-]*:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: STUDY=$(STUDY) TRIALS= EPOCHS= PORT=$(PORT) N=$(N) OUT= REGISTER= NOREGISTER= YES= DASHBOARD_PORT=$(DASHBOARD_PORT)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed ## create the virtual environment (other targets do this for you)

demo: $(VENV)/.installed ## run the offline demo study (synthetic 2-D ground truth, a few minutes)
	$(PY) -m pipeline study studies/demo.toml $(OVERRIDES)

study: $(VENV)/.installed ## run or resume STUDY (default studies/cifar2.toml); TRIALS=N EPOCHS=N override
	$(PY) -m pipeline study $(STUDY) $(OVERRIDES)

# The study is created once, then N workers share it (one torch thread each unless PIPELINE_THREADS says).
# Ctrl-C or SIGTERM to make reaches every worker (the trap forwards both): no worker is left behind.
workers: $(VENV)/.installed ## run STUDY with N worker processes on this machine (N=4); TRIALS/EPOCHS as for study
	$(PY) -m pipeline worker $(STUDY) $(OVERRIDES) --create-only
	@pids=(); trap 'kill -TERM "$${pids[@]}" 2>/dev/null; wait' INT TERM; \
	for i in $$(seq 1 $(N)); do \
		PIPELINE_THREADS=$${PIPELINE_THREADS:-1} $(PY) -m pipeline worker $(STUDY) $(OVERRIDES) --index $$i & \
		pids+=($$!); \
	done; \
	rc=0; for pid in "$${pids[@]}"; do wait "$$pid" || rc=$$?; done; exit $$rc

report: $(VENV)/.installed ## rebuild STUDY's page reports/<study>/index.html from storage and MLflow (no training)
	$(PY) -m pipeline report $(STUDY)

.PHONY: rerun schedule
# For cron/systemd: exit 0 = no drift, 3 = drift, 4 = another rerun holds the study's lock, 1/2 = failed.
rerun: $(VENV)/.installed ## rerun STUDY: continue it, retrain the selection, test it against its baseline (drift: exit 3)
	$(PY) -m pipeline rerun $(STUDY) $(OVERRIDES)

schedule: $(VENV)/.installed ## install a crontab entry that reruns STUDY at CRON (default "0 3 * * *")
	$(PY) -m pipeline schedule $(STUDY) --cron '$(CRON)' $(OVERRIDES)

gradcheck: $(VENV)/.installed ## check the hand-written backprop of STUDY's model against finite differences
	$(PY) -m pipeline gradcheck $(STUDY)

.PHONY: export
OUT ?= exported/$(basename $(notdir $(STUDY)))
REGISTER ?=
NOREGISTER ?=
export: $(VENV)/.installed ## write STUDY's selected trial to OUT (config, weights, metrics, card), registered as <study>-best@best (REGISTER=name: another name; NOREGISTER=1: not registered)
	$(PY) -m pipeline export $(STUDY) --out $(OUT) $(if $(REGISTER),--register $(REGISTER)) $(if $(NOREGISTER),--no-register)

.PHONY: bench
bench: $(VENV)/.installed ## time training, thread policies, whole processes, stage times, memory, drift (BENCH=--quick: smoke run)
	$(PY) -m pipeline bench $(BENCH)

.PHONY: gpu-check
gpu-check: $(VENV)/.installed ## on a CUDA device: oracles rerun there, trials/s one by one vs populations, a 16-trial study (reports/bench/gpu.md)
	$(PY) scripts/gpu_check.py

.PHONY: best studies delete dashboard
best: $(VENV)/.installed ## print STUDY's selected trial: params, objective (mean over seeds), test error, report, weights
	$(PY) -m pipeline best $(STUDY)

studies: $(VENV)/.installed ## list every study in storage/ (and in $OPTUNA_STORAGE): trials done/target, best, last update
	$(PY) -m pipeline studies

delete: $(VENV)/.installed ## remove STUDY's storage, MLflow experiment and reports (asks for YES=1)
	$(PY) -m pipeline delete $(STUDY) $(if $(YES),--yes)

# The storage is opened inside `pipeline dashboard`: its URL (and a password in it) is never in argv.
DASHBOARD_PORT ?= 8080
dashboard: $(VENV)/.installed ## browse STUDY's Optuna storage in optuna-dashboard on 127.0.0.1 (DASHBOARD_PORT=8080)
	@$(PY) -c 'import optuna_dashboard' 2>/dev/null || $(PY) -m pip install --quiet -e '.[dashboard]'
	$(PY) -m pipeline dashboard $(STUDY) --port $(DASHBOARD_PORT)

ui: $(VENV)/.installed ## open the MLflow UI over this project's runs on 127.0.0.1 (PORT=5000)
	@mkdir -p mlruns
	@echo "open http://127.0.0.1:$(PORT) and pick 'Model training' at the top of the sidebar for the runs tables (README: Start here)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port $(PORT)

test: $(VENV)/.installed ## run the test suite
	$(PY) -m pytest -q

lint: $(VENV)/.installed ## ruff lint
	$(VENV)/bin/ruff check pipeline tests

clean: ## remove generated reports, runs and study storage (keeps data/ and the venv)
	rm -rf reports mlruns storage .pytest_cache .ruff_cache
