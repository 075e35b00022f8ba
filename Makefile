# crmsync: `make run` starts the service on the embedded database, `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint typecheck pytest test-pg15 migrate bench bench-history bench-scale openapi lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Runtime dependencies, pinned with hashes; the package itself in editable mode.
$(VENV)/.runtime: requirements.lock pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

$(VENV)/.dev: requirements-dev.lock $(VENV)/.runtime
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes -r requirements-dev.lock
	touch $@

run: $(VENV)/.runtime
	@echo "crmsync: starting on http://$(HOST):$(PORT) (embedded PostgreSQL in ./data unless CRMSYNC_DATABASE_URL is set)"
	@echo "First admin, in another terminal:  $(BIN)/crmsync create-admin --email you@example.com --name 'Your Name'"
	@echo "API docs: http://$(HOST):$(PORT)/docs"
	$(BIN)/crmsync serve --host $(HOST) --port $(PORT)

migrate: $(VENV)/.runtime
	$(BIN)/crmsync migrate

test: lint typecheck pytest

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.dev
	$(BIN)/mypy src
	$(BIN)/mypy bench

pytest: $(VENV)/.dev
	$(BIN)/pytest

# The database tests once more on the Debian PostgreSQL 15 binaries (CI runs this too).
test-pg15: $(VENV)/.dev
	bash .ci/pg15.sh $(BIN)/pytest

# crmsync vs the Express peer and PostgreSQL's own limit (bench/README.md); ARGS="--quick" to smoke-test.
bench: $(VENV)/.dev
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/run.py $(ARGS)

# Every full run in bench/results/ side by side: how far each bar row moves between runs.
bench-history: $(VENV)/.dev
	$(BIN)/python bench/history.py $(ARGS)

# crmsync alone at 100x the team (2M contacts, 10M calls; about an hour): does the design hold.
bench-scale: $(VENV)/.dev
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/scale.py $(ARGS)

# The OpenAPI document, for the mobile team (tests/test_openapi.py fails when it is stale).
openapi: $(VENV)/.runtime
	$(BIN)/python -m crmsync.openapi > docs/openapi.json

# Pins every dependency (with hashes) from pyproject.toml; uv runs from a throwaway venv.
lock:
	$(PYTHON) -m venv /tmp/crmsync-uv && /tmp/crmsync-uv/bin/pip install --quiet uv
	/tmp/crmsync-uv/bin/uv pip compile pyproject.toml --generate-hashes --python-version 3.11 --no-header --no-annotate -o requirements.lock
	/tmp/crmsync-uv/bin/uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 --no-header --no-annotate -o requirements-dev.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
