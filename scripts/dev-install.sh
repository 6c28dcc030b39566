#!/usr/bin/env bash
# Editable install of the package for development. Serialised with a lock
# because several people (or agents) may share one work tree.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/rapidlimit-build.lock \
  python3 -m pip install -q --no-build-isolation -e ".[test]" "$@"
