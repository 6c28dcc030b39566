#!/usr/bin/env bash
# Builds and runs the C++ tests (the Redis ones included) against hiredis
# 1.x as well as the system's hiredis (Debian 12: 0.14.1): the Redis store
# codes against the API both share, and this checks that it does.
#
# PyPI is the only place besides Debian's archive that the project's
# machines reach, and the sdists of the Python `hiredis` package vendor
# the C library (vendor/hiredis): each is built here into a prefix of its
# own with a hiredis.pc laid out as upstream's CMake install lays it out
# (Cflags -I<prefix>/include/hiredis only, so that a header of Debian's
# libhiredis-dev under /usr/include/hiredis is the wrong one within reach).
# The test binary gets an rpath to that prefix, and the script checks that
# it loads that library and that CMake reported that version.
#
# Not part of CI: about ten minutes on 2 cores at -j1 for the system's
# hiredis and the default list (more with SANITIZE=1).
#
#   scripts/check-hiredis-versions.sh [PYPI_HIREDIS_VERSION ...]
#
# With no argument: the sdists listed below (which vendor hiredis 1.0.0,
# 1.1.0, 1.2.0, 1.3.0, 1.4.0 and 1.5.0). Environment: WORK (default a temp
# dir, removed at the end unless KEEP=1), JOBS (default 1), SYSTEM=0 to skip
# the system hiredis, SANITIZE=1 to build the tests with ASan/UBSan.
# Needs: python3 with pip, a C compiler, cmake, ninja, pkg-config,
# GoogleTest, redis-server (scripts/install-deps.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# PyPI hiredis version -> the hiredis C version its sdist vendors.
default_sdists=(2.0.0 2.2.3 2.4.0 3.3.1 3.4.2 3.5.0)
sdists=("$@")
[[ ${#sdists[@]} -gt 0 ]] || sdists=("${default_sdists[@]}")
jobs=${JOBS:-1}
sanitize=${SANITIZE:-0}
work=${WORK:-}
if [[ -z $work ]]; then
  work=$(mktemp -d /tmp/check-hiredis.XXXXXX)
  [[ ${KEEP:-0} == 1 ]] || trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work"
verdicts=()

log() { printf '==== %s\n' "$*" >&2; }

# Builds the hiredis vendored in PyPI's hiredis==$1 sdist into $work/prefix-$1;
# prints the C version.
build_hiredis() {
  local pyver=$1 src prefix major minor patch soname cver
  src=$work/src-$pyver
  prefix=$work/prefix-$pyver
  if [[ ! -d $src ]]; then
    python3 -m pip download -q --no-binary :all: --no-deps \
      "hiredis==$pyver" -d "$work/sdists" >&2
    mkdir -p "$src"
    tar xzf "$work/sdists/hiredis-$pyver.tar.gz" -C "$src" --strip-components=1
  fi
  src=$src/vendor/hiredis
  macro() { awk -v m="HIREDIS_$1" '$1 == "#define" && $2 == m {print $3}' \
    "$src/hiredis.h"; }
  major=$(macro MAJOR) minor=$(macro MINOR) patch=$(macro PATCH)
  soname=$(macro SONAME)
  cver=$major.$minor.$patch
  if [[ ! -f $prefix/lib/pkgconfig/hiredis.pc ]]; then
    mkdir -p "$prefix/lib/pkgconfig" "$prefix/include/hiredis" "$work/obj-$pyver"
    local objs=() f
    # What upstream's Makefile builds into libhiredis (dict.c is included
    # by async.c), without SSL.
    for f in alloc async hiredis net read sds sockcompat; do
      [[ -f $src/$f.c ]] || continue
      cc -std=c99 -O2 -g -fPIC -Wall -D_FILE_OFFSET_BITS=64 -c "$src/$f.c" \
        -o "$work/obj-$pyver/$f.o"
      objs+=("$work/obj-$pyver/$f.o")
    done
    cc -shared -Wl,-soname,"libhiredis.so.$soname" -o \
      "$prefix/lib/libhiredis.so.$soname" "${objs[@]}"
    ln -sf "libhiredis.so.$soname" "$prefix/lib/libhiredis.so"
    cp "$src"/*.h "$prefix/include/hiredis/"
    cat >"$prefix/lib/pkgconfig/hiredis.pc" <<EOF
prefix=$prefix
exec_prefix=\${prefix}
libdir=\${exec_prefix}/lib
includedir=\${prefix}/include
pkgincludedir=\${includedir}/hiredis

Name: hiredis
Description: Minimalistic C client library for Redis.
Version: $cver
Libs: -L\${libdir} -lhiredis
Cflags: -I\${pkgincludedir} -D_FILE_OFFSET_BITS=64
EOF
  fi
  echo "$cver"
}

# Configures, builds and runs the C++ tests with hiredis $2 (the version
# pkg-config must report) from PKG_CONFIG_PATH=$3 ("" for the system's);
# appends a verdict for label $1.
run_tests() {
  local label=$1 want=$2 pcpath=$3 build=$work/build-$1 out got lib flags=()
  out=$work/ctest-$label.log
  [[ $sanitize == 1 ]] && flags+=(-DRAPIDLIMIT_SANITIZE=ON
    -DCMAKE_BUILD_TYPE=RelWithDebInfo) || flags+=(-DCMAKE_BUILD_TYPE=Release)
  if [[ -n $pcpath ]]; then
    flags+=("-DCMAKE_BUILD_RPATH=${pcpath%/pkgconfig}")
  fi
  log "$label: configure"
  if ! got=$(PKG_CONFIG_PATH=$pcpath cmake -S "$root" -B "$build" -G Ninja \
    -DRAPIDLIMIT_BUILD_TESTS=ON "${flags[@]}" |
    sed -n 's/.*rapidlimit: Redis store with hiredis \(.*\)/\1/p'); then
    verdicts+=("$label: FAIL (configure)")
    return
  fi
  if [[ $got != "$want" ]]; then
    verdicts+=("$label: FAIL (CMake found hiredis '${got:-none}', not $want)")
    return
  fi
  log "$label: build"
  if ! cmake --build "$build" -j"$jobs" >"$work/build-$label.log" 2>&1; then
    tail -n 30 "$work/build-$label.log" >&2
    verdicts+=("$label: FAIL (build, see $work/build-$label.log)")
    return
  fi
  if grep -q 'warning:' "$work/build-$label.log"; then
    grep 'warning:' "$work/build-$label.log" >&2
    verdicts+=("$label: FAIL (build warnings)")
    return
  fi
  lib=$(ldd "$build/rapidlimit_tests" | awk '/libhiredis/ {print $3}')
  if [[ -n $pcpath && $lib != "${pcpath%/pkgconfig}"/* ]]; then
    verdicts+=("$label: FAIL (the tests load ${lib:-no hiredis}, not $want's)")
    return
  fi
  log "$label: ctest ($lib)"
  local rc=0
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
    timeout -k 30 1800 ctest --test-dir "$build" --output-on-failure \
    -j"$jobs" >"$out" 2>&1 || rc=$?
  local summary skipped
  summary=$(grep -E '% tests passed' "$out" || true)
  # ctest's line counts GTEST_SKIP'ed tests as passed: say how many (one
  # fork test skips under ASan by design; redis-server was checked above).
  skipped=$(grep -c '\*\*\*Skipped' "$out" || true)
  if [[ $rc == 0 ]]; then
    verdicts+=("$label: PASS ($summary, $skipped skipped; ${lib:-system})")
  else
    grep -E '\*\*\*(Failed|Exception|Timeout)' "$out" >&2 || true
    verdicts+=("$label: FAIL (${summary:-ctest exit $rc}; see $out)")
  fi
}

command -v redis-server >/dev/null || {
  echo "redis-server not found: the Redis tests would be skipped" >&2
  exit 2
}

if [[ ${SYSTEM:-1} == 1 ]]; then
  sysver=$(pkg-config --modversion hiredis 2>/dev/null || echo none)
  run_tests "system-$sysver" "$sysver" ""
fi
for pyver in "${sdists[@]}"; do
  log "hiredis $pyver (PyPI sdist): build the vendored C library"
  if ! cver=$(build_hiredis "$pyver"); then
    verdicts+=("pypi-hiredis-$pyver: FAIL (could not build its hiredis)")
    continue
  fi
  run_tests "$cver" "$cver" "$work/prefix-$pyver/lib/pkgconfig"
done

printf '\n'
status=0
for v in "${verdicts[@]}"; do
  printf 'hiredis %s\n' "$v"
  [[ $v == *": PASS "* ]] || status=1
done
exit $status
