#!/usr/bin/env bash
# The GPU suite in one command (issue 19): the CUDA tests, then the GPU table, under 8 minutes on one GPU.
#   bash scripts/gpu_check.sh            # in an environment with a CUDA build of torch and the project installed
# It uses $PYTHON (default: .venv/bin/python when it exists, else python3). On a machine without the project's
# dependencies, install them first (`TORCH_SPEC=... make setup`), or carry wheels and `pip install --no-index
# --find-links DIR .[all]`. Without CUDA it says so and exits 0, having run nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device visible to $PYTHON: nothing to run"
  exit 0
fi
"$PYTHON" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(0), "torch", torch.__version__)'
status=0
timeout 360 "$PYTHON" -m pytest tests/gpu tests/test_devices.py tests/problems/test_navier_stokes.py -m gpu -q \
  -p no:cacheprovider -o addopts="--import-mode=importlib" || status=$?
timeout 240 "$PYTHON" benchmarks/gpu_table.py || status=$?
echo "gpu_check: exit status $status"
exit $status
