# One entry point for people, CI and hooks. `make run` and `make test` work on a fresh
# machine with Python 3.11+: they create the virtualenv, find or start Redis and PostgreSQL
# (scripts/devstack.py), and go.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA := .guichet
ENV_FILE := $(DATA)/env.sh
HOST ?= 127.0.0.1
PORT ?= 8080

SCENARIO ?= fcfs
USERS ?= 60
TIME ?= 60s

.PHONY: help venv services run test lint typecheck pytest sweep load bench memory instructions stop clean

help:
	@echo "make run    start the engine with local Redis, PostgreSQL and demo data"
	@echo "make test   lint, type-check and run the test suite"
	@echo "make load   a Locust scenario (SCENARIO=fcfs|draw USERS=60 TIME=60s)"
	@echo "make bench  the peak-capacity benchmark (BENCHMARKS.md)"
	@echo "make memory  one worker's memory under a flood of new addresses (BENCHMARKS.md)"
	@echo "make instructions  instructions per request under callgrind (before/after a change)"
	@echo "make stop   stop the private Redis/PostgreSQL that make started (if any)"

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "make: Python 3.11 or newer is needed (set PYTHON=python3.x)"; exit 1; }
	@$(PYTHON) -m venv $(VENV) || \
		{ echo "make: '$(PYTHON) -m venv' failed; install the venv module (Debian: apt-get install python3-venv)"; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed

services: venv
	$(PY) scripts/devstack.py up

$(DATA)/admin-token:
	@mkdir -p $(DATA)
	@$(PY) -c 'import secrets; print(secrets.token_urlsafe(24))' > $@
	@chmod 600 $@

run: services $(DATA)/admin-token
	@. ./$(ENV_FILE) && $(PY) -m engine migrate && $(PY) -m engine demo
	@echo ""
	@echo "guichet is starting on http://$(HOST):$(PORT)   (Ctrl-C stops it)"
	@echo "  curl -s http://$(HOST):$(PORT)/v1/sites"
	@echo "  curl -s 'http://$(HOST):$(PORT)/v1/releases?site=bobigny'"
	@echo "  admin token: $$(cat $(DATA)/admin-token)   (in $(DATA)/admin-token)"
	@echo "  the booking flow, step by step: README.md"
	@echo ""
	@. ./$(ENV_FILE) && GUICHET_ADMIN_TOKEN=$${GUICHET_ADMIN_TOKEN:-$$(cat $(DATA)/admin-token)} \
		GUICHET_HOST=$(HOST) GUICHET_PORT=$(PORT) exec $(PY) -m engine serve

test: lint typecheck pytest

lint: venv
	$(VENV)/bin/ruff check engine tests scripts loadtests
	$(VENV)/bin/ruff format --check engine tests scripts loadtests
	$(VENV)/bin/hadolint deploy/Dockerfile

typecheck: venv
	$(VENV)/bin/mypy --strict engine

# The tests start private Redis servers too (outages, a cluster): --for-tests makes sure
# the redis-server binary is there, even where a Redis already answers.
pytest: venv
	$(PY) scripts/devstack.py up --for-tests
	. ./$(ENV_FILE) && $(VENV)/bin/pytest $(PYTEST_ARGS)

# A Locust scenario (SCENARIO=fcfs or draw), headless, against an engine it starts (or
# LOAD_ARGS='--host URL --admin-token=TOKEN --difficulty BITS --database-url DSN' for a
# running one). Reports: loadtests/reports/.
load: services
	. ./$(ENV_FILE) && $(PY) loadtests/run_load.py --scenario $(SCENARIO) --users $(USERS) \
		--time $(TIME) $(LOAD_ARGS)

bench: services
	. ./$(ENV_FILE) && $(PY) loadtests/bench.py

# One worker's memory under a flood of new addresses, round by round (BENCHMARKS.md, "Memory").
memory: services
	. ./$(ENV_FILE) && $(PY) loadtests/memory.py

# Instructions per request under valgrind's callgrind: repeatable, for before/after a change.
instructions: services
	. ./$(ENV_FILE) && $(PY) loadtests/instructions.py

sweep: services
	. ./$(ENV_FILE) && $(PY) -m engine sweep

stop:
	@test -x $(PY) && $(PY) scripts/devstack.py down || true

clean: stop
	rm -rf $(VENV) $(DATA) .mypy_cache .ruff_cache .pytest_cache .hypothesis
