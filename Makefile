# Targets used by the README. Each creates the virtualenv (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint format init-db bench container-check clean

$(BIN)/.installed: requirements.txt requirements-dev.txt client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

run: $(BIN)/.installed  ## run the service under gunicorn (embedded SQLite by default)
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

test: $(BIN)/.installed  ## run the test suite (MySQL tests skip without a server, unless CI=true)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

init-db: $(BIN)/.installed  ## create the database and tables of the configured driver
	$(BIN)/flask --app wsgi init-db

$(BIN)/.bench-installed: $(BIN)/.installed requirements-bench.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	touch $@

bench: $(BIN)/.bench-installed  ## run the benchmark against MariaDB (see docs/PERFORMANCE.md)
	$(BIN)/python -m bench $(BENCH_ARGS)

# Builds the Dockerfile with podman and runs the image against SQLite, MariaDB on
# 127.0.0.1:3306 and docker-compose.yml (needs root, Debian, several minutes). It
# clones this checkout: only committed changes are built. Not part of `make test`.
CONTAINER_CHECK ?= ../shared/tools/container-check.sh

container-check:  ## build and run the container image with podman (see docs/DEPLOYMENT.md)
	SRC=$(CURDIR) bash $(CONTAINER_CHECK)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
