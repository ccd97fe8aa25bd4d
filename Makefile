# Every target does its own set-up (idempotent): Debian packages, Consul, .venv.
SHELL := /bin/bash
PY := .venv/bin/python
# On CI a Docker engine must come up; elsewhere Docker tests skip with the reason if it cannot.
export ATFAILOVER_REQUIRE_DOCKER ?= $(if $(filter true,$(CI)),1,0)
PYTEST_ARGS ?=

.PHONY: setup test lint unit demo bench clean

setup:
	@scripts/bootstrap.sh

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy .

## The whole test suite: lint, unit tests, integration tests against real etcd, Consul, Docker.
test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

## The main job on a local default cluster (see README).
demo: setup
	$(PY) -m chaos demo

## Benchmarks: each writes JSON and a PNG plot under bench/results/.
bench: setup
	@set -e; for f in bench/*_bench.py; do echo "== $$f"; $(PY) $$f; done

clean:
	rm -rf .venv .tools .pytest_cache .mypy_cache .ruff_cache
