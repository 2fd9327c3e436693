# One-command entry points. Everything runs from the project virtualenv (.venv), built on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?= tiny
PYTEST_ARGS ?=
WORLD ?= out/demo/world
TLS_PROFILE ?= compose

.PHONY: help venv demo test test-fast bench serve tls-certs lock clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)  ## create .venv with the pinned dependencies

demo: venv  ## the main job: CoinRun data, train tiny models, evaluate, write out/demo/
	$(BIN)/genie demo --preset $(PRESET) --out out/demo

test: venv  ## the whole test suite (starts its own Triton servers on loopback ports)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: venv  ## unit tests only (no servers, no training)
	$(BIN)/python -m pytest -q -m "not slow and not integration" $(PYTEST_ARGS)

bench: venv  ## CPU benchmarks of training and world stepping (see README)
	$(BIN)/python bench/bench_models.py --preset $(PRESET)

serve: venv  ## serve WORLD (default out/demo/world): Triton services + gateway on 127.0.0.1:50051, auth off (development)
	GENIE_GATEWAY_AUTH=$${GENIE_GATEWAY_AUTH:-none} $(BIN)/genie serve stack --world $(WORLD)

tls-certs:  ## dev CA + certificates: TLS_PROFILE=compose (to deploy/secrets/tls) or k8s (deploy/secrets/tls-k8s)
	deploy/tls/make-dev-certs.sh $(TLS_PROFILE)

lock:  ## re-resolve requirements.in into the pinned requirements.txt
	$(BIN)/pip install --quiet -r requirements.in
	( echo "# Pinned lock of requirements.in (regenerate: make lock). torch must stay ==2.13.0, numpy<2."; \
	  $(BIN)/pip freeze | grep -v '^-e' | sed 's/^torch==2.13.0+cpu/torch==2.13.0/' ) > requirements.txt

clean:  ## remove build and demo outputs (keeps .venv)
	rm -rf out build *.egg-info .pytest_cache
