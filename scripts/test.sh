#!/usr/bin/env bash
# Every test of rapidlimit, from a fresh clone:
#   system packages -> a clean virtualenv with the package and its test
#   extras -> GoogleTest (plain and with ASan/UBSan) through ctest ->
#   format, lint and type checks -> pytest (Redis tests included) ->
#   the Python module built without hiredis -> the quick benchmark run
#   (kept in the log; fails only if broken).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
jobs=$(nproc 2>/dev/null || echo 2)

step() { printf '\n==== %s (%ss)\n' "$1" "$SECONDS"; }

step "system packages"
scripts/install-deps.sh --bench

step "virtualenv + package"
venv=$root/build/venv
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q ".[dev]"

step "C++ tests (Release)"
export PATH=$venv/bin:$PATH  # cmake, ninja, ruff, mypy from the venv
cmake -S . -B build/cpp -G Ninja -DRAPIDLIMIT_BUILD_TESTS=ON \
  -DRAPIDLIMIT_BUILD_BENCHMARKS=ON >/dev/null
cmake --build build/cpp -j"$jobs"
# Each test has 120 s (CMakeLists.txt); this bounds the whole run too.
timeout -k 30 900 ctest --test-dir build/cpp --output-on-failure -j"$jobs"

step "C++ tests (AddressSanitizer + UBSan)"
cmake -S . -B build/cpp-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DRAPIDLIMIT_BUILD_TESTS=ON -DRAPIDLIMIT_SANITIZE=ON >/dev/null
cmake --build build/cpp-asan -j"$jobs"
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  timeout -k 30 900 ctest --test-dir build/cpp-asan --output-on-failure -j"$jobs"

step "format, lint, types"
git ls-files -co --exclude-standard -- 'cpp/*.h' 'cpp/*.cc' 'tests/cpp/*.h' \
  'tests/cpp/*.cc' 'benchmarks/*.cc' | xargs clang-format --dry-run -Werror
"$venv/bin/ruff" check python tests/python examples benchmarks scripts
"$venv/bin/ruff" format --check python tests/python examples benchmarks scripts
"$venv/bin/mypy"

step "pytest"
# The source package lives under python/, which is not on sys.path here:
# the tests import the installed wheel, as users do.
# pytest-timeout fails a hung test; the outer bound also covers the exit
# (a child process that never ends would otherwise hold it for hours).
timeout -k 30 1800 "$venv/bin/python" -m pytest -q -p no:cacheprovider

step "Python module built without hiredis"
# README: hiredis is optional at build time. The same sources, configured
# without Redis, must build, import and serve the memory store.
nohiredis=$root/build/py-nohiredis
cmake -S . -B "$nohiredis" -G Ninja -DRAPIDLIMIT_REDIS=OFF \
  -DRAPIDLIMIT_BUILD_PYTHON=ON -DRAPIDLIMIT_BUILD_TESTS=OFF \
  -DPython_EXECUTABLE="$venv/bin/python" \
  -Dpybind11_DIR="$("$venv/bin/python" -m pybind11 --cmakedir)" >/dev/null
cmake --build "$nohiredis" -j"$jobs" --target _core
rm -rf "$nohiredis/pkg" && mkdir -p "$nohiredis/pkg"
cp -r python/rapidlimit "$nohiredis/pkg/"
cp "$nohiredis"/_core*.so "$nohiredis/pkg/rapidlimit/"
PYTHONPATH="$nohiredis/pkg:$root/examples" \
  "$venv/bin/python" tests/python/no_hiredis_check.py "$nohiredis/pkg"

if [[ -x benchmarks/run.sh ]]; then
  step "benchmarks (quick mode)"
  PYTHON="$venv/bin/python" timeout -k 30 1800 benchmarks/run.sh --quick
fi
step "done"
