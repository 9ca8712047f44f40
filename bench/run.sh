#!/bin/sh
# Run every blockrep benchmark; see bench/README.md for what each figure means.
#
#   bench/run.sh                 fio comparison with default options, then pytest-benchmark
#   bench/run.sh --quick         extra arguments go to bench/fio_compare.py
#
# Results land in bench/results/ (fio-<timestamp>.md, replication-<timestamp>.md,
# schedule-<timestamp>.md, pytest-bench-<timestamp>.json).
# Exit status: non-zero if either part failed.
set -u
cd "$(dirname "$0")/.." || exit 1

PY=.venv/bin/python
[ -x "$PY" ] || PY=/usr/bin/python3   # fio_compare.py needs only the standard library

status=0
"$PY" bench/fio_compare.py "$@" || status=$?

if [ -x .venv/bin/python ]; then
    .venv/bin/python bench/replication_bench.py || status=$?
    .venv/bin/python bench/schedule_bench.py || status=$?
fi

if ls bench/test_bench_*.py >/dev/null 2>&1; then
    if [ -x .venv/bin/python ]; then
        mkdir -p bench/results
        .venv/bin/python -m pytest bench/ --benchmark-only \
            --benchmark-json="bench/results/pytest-bench-$(date +%Y%m%d-%H%M%S).json" \
            || status=$?
    else
        echo "bench/run.sh: .venv missing (run scripts/bootstrap.sh); skipping pytest benchmarks" >&2
        status=1
    fi
fi
exit "$status"
