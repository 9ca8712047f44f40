# blockrep developer entry points. Every target that runs code first runs the idempotent bootstrap.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python

.PHONY: all bootstrap demo test test-image soak soak-replication fuzz bench build man lint clean

all: test

bootstrap:
	scripts/bootstrap.sh

demo: bootstrap
	scripts/demo.sh

test: bootstrap
	$(PY) -m pytest -q --durations=15 tests

# The whole suite with every volume on the image backend (issue 11; CI runs the image backend's own
# tests and the parametrised variants in `make test`)
test-image: bootstrap
	BLOCKREP_TEST_BACKEND=image $(PY) -m pytest -q --durations=15 tests

# RELIABILITY R19: the soak (mixed workload, snapshots, collector, replication, kills, link faults) for
# DURATION seconds (default 300; `make test` runs it for 75); SEED=N replays a schedule (BLOCKREP_SOAK_SEED)
soak: bootstrap
	BLOCKREP_SOAK_SECONDS=$(if $(filter command line environment,$(origin DURATION)),$(DURATION),300) \
	$(if $(SEED),BLOCKREP_SOAK_SEED=$(SEED)) $(PY) -m pytest -q -s -rxX tests/test_soak.py

# RELIABILITY R15: 50 SIGKILLs of the replication worker (and 3 of the DR) at random points
soak-replication: bootstrap
	BLOCKREP_KILLS=50 $(PY) -m pytest -q -s -rxX tests/test_replication_kills.py

# RELIABILITY R16: the long decoder-fuzzing tier (atheris; DURATION seconds per target, TARGETS to
# pick some of segments checkpoint volume_json control replication_json export_name manifest).
# The short tier is tests/test_fuzz_decoders.py, part of `make test`.
DURATION ?= 60
fuzz: bootstrap
	$(VENV)/bin/python -c "import atheris" 2>/dev/null || $(VENV)/bin/pip install -q atheris || true
	$(PY) -m tests.fuzz.run --duration $(DURATION) $(TARGETS)

bench: bootstrap
	bench/run.sh

build:
	$(PY) -m engine._native_build

# blockrep(1) from the parser's help texts, into .venv/share/man/man1 (bootstrap does it too)
man:
	scripts/manpage.sh

lint:
	$(VENV)/bin/mypy engine
	$(VENV)/bin/ruff check engine nbd_plugin tests bench

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache demo-vol
	rm -f engine/_native*.so engine/_native*.o
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
