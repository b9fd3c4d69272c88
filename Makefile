# Two commands from a fresh clone (each sets up what it needs):
#   make demo   run the quickstart example DAG end to end (emulator unless FAL_KEY is set)
#   make test   run the whole test suite
#   make system-test   the system tests: a real Celery deployment on PostgreSQL, Redis, moto S3 (docs/system-tests.md)
# AIRFLOW_VERSION=3.0.0 make test   runs the suite against another Airflow release.

PYTHON ?= python3
AIRFLOW_VERSION ?= 3.3.2
VENV ?= .venv/airflow-$(AIRFLOW_VERSION)
PY := $(VENV)/bin/python
# Older Airflow releases are resolved as of shortly after their release date (Airflow's own
# constraint files live on GitHub): unconstrained, 3.1.8 and 3.2.2 pick up a newer cadwyn/FastAPI
# whose schemas their API server cannot build. fal-client (test only) is exempt.
RESOLVED_AS_OF_3.1.8 := 2026-03-18
RESOLVED_AS_OF_3.2.2 := 2026-06-05
AS_OF := $(RESOLVED_AS_OF_$(AIRFLOW_VERSION))
UV_AS_OF := $(if $(AS_OF),--exclude-newer $(AS_OF)T00:00:00Z --exclude-newer-package fal-client=2026-12-01T00:00:00Z,)
# Every virtualenv is installed with the pins of the last green CI run (constraints/, as Airflow's
# own constraint files do): a new release on PyPI cannot turn CI red overnight (celery 5.7.0 did:
# the Celery provider's workers die at import). For another Python, or CONSTRAINTS= (empty), the
# newest releases are resolved instead; `make constraints` writes the pins of the current venvs.
PYTHON_MINOR := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
CONSTRAINTS ?= constraints/airflow-$(AIRFLOW_VERSION)-py$(PYTHON_MINOR).txt
SYSTEM_CONSTRAINTS ?= constraints/system-$(AIRFLOW_VERSION)-py$(PYTHON_MINOR).txt
pinned = $(if $(wildcard $(1)),--constraint $(1),)
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(wildcard $(CONSTRAINTS)) | cksum | cut -d' ' -f1)$(AS_OF)
PYTEST_ARGS ?=
# The system tests get their own virtualenv: the "system" extra (Celery, Amazon, moto, s3fs, PostgreSQL drivers).
SYSTEM_VENV ?= .venv/system-$(AIRFLOW_VERSION)
SYSTEM_STAMP := $(SYSTEM_VENV)/.installed-$(shell cat pyproject.toml $(wildcard $(SYSTEM_CONSTRAINTS)) | cksum | cut -d' ' -f1)$(AS_OF)

.PHONY: demo test lint bench venv clean release-check system-test constraints

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	VIRTUAL_ENV=$(VENV) $(VENV)/bin/uv pip install -q $(UV_AS_OF) $(call pinned,$(CONSTRAINTS)) "apache-airflow==$(AIRFLOW_VERSION)" -e ".[test]"
	@touch $@

$(SYSTEM_STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ is required"'
	$(PYTHON) -m venv $(SYSTEM_VENV)
	$(SYSTEM_VENV)/bin/python -m pip install -q --upgrade pip uv
	VIRTUAL_ENV=$(SYSTEM_VENV) $(SYSTEM_VENV)/bin/uv pip install -q $(UV_AS_OF) $(call pinned,$(SYSTEM_CONSTRAINTS)) "apache-airflow==$(AIRFLOW_VERSION)" -e ".[test,system]"
	@touch $@

# PostgreSQL and redis-server are installed with apt-get when missing (as root); here a missing
# piece fails the run instead of skipping it (FAL_SYSTEM_TESTS_REQUIRED).
system-test: $(SYSTEM_STAMP)
	FAL_SYSTEM_TESTS_REQUIRED=1 $(SYSTEM_VENV)/bin/python -m pytest -q -s -p no:cacheprovider -m system tests/system $(PYTEST_ARGS)

demo: venv
	bash scripts/demo.sh $(PY)

# UV_CONSTRAINT: the browser test installs playwright with uv when it is missing (tests/browser)
test: venv
	$(if $(wildcard $(CONSTRAINTS)),UV_CONSTRAINT=$(abspath $(CONSTRAINTS)) )$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Build the sdist and wheel, twine check them, install the wheel alone into a clean virtualenv
# with Airflow and list the provider there (scripts/release_check.sh).
release-check:
	CONSTRAINTS="$(wildcard $(CONSTRAINTS))" bash scripts/release_check.sh $(AIRFLOW_VERSION)

# Pin what the current virtualenvs hold (after a green CI run): the test venv of AIRFLOW_VERSION
# and, when it exists, its system-test venv. The installers themselves are not pinned.
TOOLING := ^(pip|setuptools|uv|wheel)==
# $(1): a virtualenv, $(2): the file its pins go to
define write_pins
{ echo "# Pins of $(1) on Python $(PYTHON_MINOR), written by make constraints on $$(date -u +%F)."; \
  $(1)/bin/uv pip freeze --exclude-editable --python $(1)/bin/python 2>/dev/null | grep -v -E "$(TOOLING)"; } > $(2)
endef
constraints:
	@mkdir -p constraints
	$(call write_pins,$(VENV),constraints/airflow-$(AIRFLOW_VERSION)-py$(PYTHON_MINOR).txt)
	if [ -x $(SYSTEM_VENV)/bin/python ]; then $(call write_pins,$(SYSTEM_VENV),constraints/system-$(AIRFLOW_VERSION)-py$(PYTHON_MINOR).txt); fi

bench: venv
	VIRTUAL_ENV=$(VENV) $(VENV)/bin/uv pip install -q fal-client
	$(PY) bench/hook_overhead.py

clean:
	rm -rf .venv
