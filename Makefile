# Two commands from a fresh clone (each sets up what it needs):
#   make demo   run the quickstart example DAG end to end (emulator unless FAL_KEY is set)
#   make test   run the whole test suite
# AIRFLOW_VERSION=3.0.0 make test   runs the suite against another Airflow release.

PYTHON ?= python3
AIRFLOW_VERSION ?= 3.3.2
VENV ?= .venv/airflow-$(AIRFLOW_VERSION)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: demo test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	VIRTUAL_ENV=$(VENV) $(VENV)/bin/uv pip install -q "apache-airflow==$(AIRFLOW_VERSION)" -e ".[test]"
	@touch $@

demo: venv
	bash scripts/demo.sh $(PY)

test: venv
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: venv
	VIRTUAL_ENV=$(VENV) $(VENV)/bin/uv pip install -q fal-client
	$(PY) bench/hook_overhead.py

clean:
	rm -rf .venv
