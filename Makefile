# blockrep developer entry points. Every target that runs code first runs the idempotent bootstrap.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python

.PHONY: all bootstrap demo test soak-replication bench build lint clean

all: test

bootstrap:
	scripts/bootstrap.sh

demo: bootstrap
	scripts/demo.sh

test: bootstrap
	$(PY) -m pytest -q tests

# RELIABILITY R15: 50 SIGKILLs of the replication worker (and 3 of the DR) at random points
soak-replication: bootstrap
	BLOCKREP_KILLS=50 $(PY) -m pytest -q -s -rxX tests/test_replication_kills.py

bench: bootstrap
	bench/run.sh

build:
	$(PY) -m engine._native_build

lint:
	$(VENV)/bin/mypy engine
	$(VENV)/bin/ruff check engine nbd_plugin tests bench

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache demo-vol
	rm -f engine/_native*.so engine/_native*.o
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
