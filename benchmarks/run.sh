#!/usr/bin/env bash
# rapidlimit benchmark suite: rapidlimit vs slowapi + limits vs no limiter,
# in the same run. Prints medians (min - max), ratios and targets, and writes
# JSON under benchmarks/results/.
#
#   benchmarks/run.sh                  full run (about 45 minutes on 2 cores)
#   benchmarks/run.sh --quick          CI mode, under two minutes
#   benchmarks/run.sh --only core asgi sections: core asgi http redis memory callgrind
#   benchmarks/run.sh --json out.json --markdown out.md
#
# Uses $PYTHON (default python3), which needs rapidlimit, slowapi, limits,
# fastapi, uvicorn and redis installed (pip install -e ".[test]"). System
# tools: wrk, redis-server, valgrind, taskset (scripts/install-deps.sh --bench).
# Exits non-zero only when a benchmark is broken, never for slow timings.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
# Unbuffered, so that CI logs show progress as it happens.
exec "$py" -u "$here/suite.py" "$@"
