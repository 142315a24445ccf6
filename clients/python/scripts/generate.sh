#!/usr/bin/env bash
# Generates the gRPC stubs of the contract (proto/cachecoord/v1/*.proto) into
# cachecoord_client/_proto with grpcio-tools (pinned in requirements-dev.txt),
# with .pyi type stubs, and rewrites the imports so they resolve inside the
# package (protoc emits `from cachecoord.v1 import ...`).
#
# Usage: scripts/generate.sh           regenerate in place
#        scripts/generate.sh --check   regenerate into a temp dir and fail when
#                                      the checked-in stubs differ (CI)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
repo=$(cd "$here/../.." && pwd)
python=${PYTHON:-python3}

gen() { # gen OUTDIR
  local out=$1
  mkdir -p "$out/cachecoord/v1"
  "$python" -m grpc_tools.protoc -I "$repo/proto" \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    "$repo"/proto/cachecoord/v1/*.proto
  touch "$out/__init__.py" "$out/cachecoord/__init__.py" "$out/cachecoord/v1/__init__.py"
  # Absolute `cachecoord.v1` imports become package-relative ones.
  sed -i -E 's/^from cachecoord\.v1 import /from . import /' "$out"/cachecoord/v1/*.py "$out"/cachecoord/v1/*.pyi
}

target="$here/cachecoord_client/_proto"
if [ "${1:-}" = "--check" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  gen "$tmp"
  if ! diff -r -x __pycache__ "$tmp" "$target"; then
    echo "generated stubs are stale: run clients/python/scripts/generate.sh and commit" >&2
    exit 1
  fi
  echo "generated stubs are up to date"
else
  rm -rf "$target"
  gen "$target"
fi
