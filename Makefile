# One-command entry points. Everything runs from the project virtualenv (.venv), built on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?= tiny
PYTEST_ARGS ?=

.PHONY: help venv system-deps demo test test-fast bench serve lock clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)  ## create .venv with the pinned dependencies

system-deps:  ## install the system packages the integration tests need (Redis) when missing
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }

demo: venv  ## the main job: CoinRun data, train tiny models, evaluate, write out/demo/
	$(BIN)/genie demo --preset $(PRESET) --out out/demo

test: venv system-deps  ## the whole test suite (starts its own Redis, S3 and Triton servers)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: venv  ## unit tests only (no servers, no training)
	$(BIN)/python -m pytest -q -m "not slow and not integration" $(PYTEST_ARGS)

bench: venv  ## CPU benchmarks of training and world stepping (see README)
	$(BIN)/python bench/bench_models.py --preset $(PRESET)

lock:  ## re-resolve requirements.in into the pinned requirements.txt
	$(BIN)/pip install --quiet -r requirements.in
	( echo "# Pinned lock of requirements.in (regenerate: make lock). torch must stay ==2.13.0, numpy<2."; \
	  $(BIN)/pip freeze | grep -v '^-e' | sed 's/^torch==2.13.0+cpu/torch==2.13.0/' ) > requirements.txt

clean:  ## remove build and demo outputs (keeps .venv)
	rm -rf out build *.egg-info .pytest_cache
