#!/usr/bin/env bash
# Creates .venv and installs enkg-dist with every dependency pinned; idempotent (re-runs only when inputs change).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # a GPU user may set e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."
VENV=${VENV:-.venv}
stamp="$VENV/.enkg-setup-stamp"
want=$(cat pyproject.toml requirements/constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)-$TORCH_SPEC
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip>=24"
# torch first, pinned, so that nothing later pulls a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q $TORCH_SPEC
"$VENV/bin/python" -m pip install -q -c requirements/constraints.txt -e ".[all]"
echo "$want" > "$stamp"
echo "setup: $("$VENV/bin/python" -c 'import torch, ray, zarr; print("torch", torch.__version__, "ray", ray.__version__, "zarr", zarr.__version__)')"
