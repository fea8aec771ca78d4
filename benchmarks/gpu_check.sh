#!/usr/bin/env bash
# The GPU check in one command (see benchmarks/gpu_check.py for what it measures), for a machine with an NVIDIA GPU,
# Python 3.12 and a CUDA build of torch but no Megatron-Core and no network: `make gpu-wheels` (on a machine with
# network) puts the wheels it needs in .whl/ (about 40 MB; carry them along), and this script installs them into
# /tmp/gpu-check-site before running. Results: benchmarks/results_gpu.json. On a machine without a GPU it says so.
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU here ($PYTHON has no torch, or torch.cuda.is_available() is False): nothing measured"
    exit 0
fi
if ! "$PYTHON" -c 'import megatron.core' 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu_check: Megatron-Core is not installed and .whl/ holds no wheels: run \`make gpu-wheels\` where there is network, carry .whl/" >&2
        exit 1
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site .whl/*.whl
    export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TORCHDYNAMO_DISABLE=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
