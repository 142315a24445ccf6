#!/usr/bin/env bash
# Regenerates src/gen from proto/ into a temp dir and fails when the checked-in code differs
# (CI). Run after `npm ci`; to update the checked-in code: `npm run generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/node_modules/.bin:$PATH"  # buf and protoc-gen-es of this package
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
buf generate -o "$tmp"
if ! diff -r "$tmp/src/gen" src/gen; then
  echo "clients/node/src/gen is stale: run 'npm run generate' in clients/node and commit" >&2
  exit 1
fi
echo "generated TypeScript is up to date"
