# The two commands of the README: `make demo` and `make test`. Everything else is a step.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TEST_SETTINGS := DJANGO_SETTINGS_MODULE=config.settings.test
# pytest-xdist processes: most tests wait on real workers, so more processes than cores pay.
PYTEST_WORKERS ?= 4

.PHONY: demo test venv venv-dev services migrate lint check-migrations pytest run worker beat clean

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.runtime: requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(VENV)/bin/python
	$(PY) -m pip install -q -r requirements-dev.txt
	@touch $@ $(VENV)/.runtime

venv: $(VENV)/.runtime
venv-dev: $(VENV)/.dev

## demo: set up (virtualenv, install, migrate), run the demo workflow on a real worker and beat, print its record, load sample data for the console.
demo: venv
	PY=$(PY) bash scripts/demo.sh

## test: set up and run the whole suite against PostgreSQL and Redis, plus checks and lint.
test: venv-dev services lint check-migrations pytest

services:
	@bash scripts/ensure_services.sh

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

check-migrations:
	$(TEST_SETTINGS) $(PY) manage.py check --fail-level WARNING
	$(TEST_SETTINGS) $(PY) manage.py makemigrations --check --dry-run

pytest:
	$(PY) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

## Processes by hand (see README).
run: venv
	$(PY) manage.py runserver

worker: venv
	$(VENV)/bin/celery -A config worker -l info

beat: venv
	$(VENV)/bin/celery -A config beat -l info

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
