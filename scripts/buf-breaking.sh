#!/usr/bin/env bash
# Fails when the contract (proto/) breaks callers compared with a base commit: the previous
# commit of main by default (HEAD's first parent, which for a merge is main before it).
# Rules: buf.yaml's `breaking` section (FILE: generated code keeps compiling, and the wire
# format and JSON names keep working).
#
# Usage: scripts/buf-breaking.sh [BASE_REF]     (default: HEAD^)
#
# CI runs in a fresh clone, possibly a shallow one: when the base commit is missing, it is
# fetched (one commit deeper) from origin. The base's proto/ and buf.yaml are taken with
# `git archive`, so buf never clones the repository itself.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-HEAD^}

if ! git rev-parse --verify --quiet "$base^{commit}" >/dev/null; then
  if [ "$(git rev-parse --is-shallow-repository)" = true ]; then
    echo "shallow clone: fetching one more commit of history for $base"
    git fetch --quiet --deepen=1 origin "$(git rev-parse --abbrev-ref HEAD 2>/dev/null || echo HEAD)" ||
      git fetch --quiet --deepen=1 origin || true
  fi
fi
if ! git rev-parse --verify --quiet "$base^{commit}" >/dev/null; then
  if [ "$(git rev-list --count HEAD)" = 1 ] && [ "$(git rev-parse --is-shallow-repository)" = false ]; then
    echo "buf breaking: HEAD is the first commit, nothing to compare with"
    exit 0
  fi
  echo "buf breaking: base commit $base is not available (shallow clone without a reachable origin?)" >&2
  exit 1
fi

sha=$(git rev-parse --short "$base^{commit}")
if ! git cat-file -e "$sha:proto" 2>/dev/null; then
  echo "buf breaking: $base ($sha) has no proto/, nothing to compare with"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git archive "$sha" proto buf.yaml | tar -x -C "$tmp"
buf breaking --against "$tmp"
echo "buf breaking: the contract is compatible with $base ($sha)"
