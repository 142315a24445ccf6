#!/usr/bin/env bash
# Builds the package as a user would (`python -m build`: sdist, then the wheel from it),
# installs the wheel into a fresh venv with the README's own install line, and checks what
# landed: the metadata, py.typed and the .pyi stubs (mypy --strict type-checks a caller
# against the installed package alone), and that the core imports without FastAPI or Celery.
#
# Usage: PYTHON=.venv/bin/python clients/python/scripts/check-wheel.sh
#   PYTHON must have `build` and `mypy` (requirements-dev.txt).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
repo=$(cd "$here/../.." && pwd)
python=${PYTHON:-python3}
python=$(cd "$(dirname "$python")" && pwd)/$(basename "$python")

# The README's install line, run as written from the repository root.
install_line='pip install clients/python/dist/cachecoord_client-0.1.0-py3-none-any.whl'
if ! grep -qF -- "$install_line" "$here/README.md"; then
  echo "clients/python/README.md no longer shows: $install_line (keep this script in step)" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$here/dist"
"$python" -m build --outdir "$here/dist" "$here" >"$tmp/build.log" 2>&1 || { cat "$tmp/build.log" >&2; exit 1; }
ls "$here/dist"

python3 -m venv "$tmp/venv"
(cd "$repo" && PATH="$tmp/venv/bin:$PATH" $install_line --quiet)

"$tmp/venv/bin/python" - <<'EOF'
import importlib.metadata as md
import importlib.util

meta = md.metadata("cachecoord-client")
assert meta["Name"] == "cachecoord-client" and meta["Version"] == "0.1.0", meta
assert meta["Requires-Python"] == ">=3.9", meta["Requires-Python"]
assert meta["License-Expression"] == "Apache-2.0", meta["License-Expression"]
assert "Typing :: Typed" in meta.get_all("Classifier")
requires = meta.get_all("Requires-Dist")
assert any(r.startswith("grpcio") for r in requires) and any(r.startswith("protobuf") for r in requires), requires
# FastAPI and Celery only behind their extras.
for extra in ("fastapi", "celery"):
    assert extra in meta.get_all("Provides-Extra"), extra
    assert all(f'extra == "{extra}"' in r for r in requires if r.startswith(extra)), requires
assert meta["Description-Content-Type"] == "text/markdown"

files = {str(f) for f in md.files("cachecoord-client")}
for needed in ("cachecoord_client/py.typed", "cachecoord_client/_proto/cachecoord/v1/cache_pb2.pyi",
               "cachecoord_client/fastapi.py", "cachecoord_client/celery.py"):
    assert needed in files, needed
assert not any(f.startswith(("tests/", "examples/", "scripts/")) for f in files), sorted(files)

import cachecoord_client  # the core needs neither framework
assert importlib.util.find_spec("fastapi") is None and importlib.util.find_spec("celery") is None
print("wheel metadata and files: ok")
EOF

# py.typed works: mypy --strict resolves the package from the fresh venv only.
cat >"$tmp/caller.py" <<'EOF'
from typing import Optional

from cachecoord_client import Client, RateLimitResult


def read(client: Client) -> Optional[bytes]:
    return client.cache.get("k", timeout=0.5)


def check(client: Client) -> RateLimitResult:
    return client.rate_limit.check("k", limit=1, period=60)
EOF
mypy=$(dirname "$python")/mypy
(cd "$tmp" && "$mypy" --strict --no-incremental --python-executable "$tmp/venv/bin/python" caller.py)
echo "wheel: ok"
