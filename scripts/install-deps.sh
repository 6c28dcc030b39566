#!/usr/bin/env bash
# Installs the system packages rapidlimit's build, tests and benchmarks use,
# when they are missing (Debian/Ubuntu). Needs root or sudo.
#   scripts/install-deps.sh          build + test packages
#   scripts/install-deps.sh --bench  also wrk and valgrind for benchmarks/
set -euo pipefail

packages=(g++ pkg-config libhiredis-dev libgtest-dev redis-server clang-format)
if [[ "${1:-}" == "--bench" ]]; then
  packages+=(libbenchmark-dev wrk valgrind)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi

sudo=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "install as root: ${missing[*]}" >&2; exit 1; }
  sudo=sudo
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
