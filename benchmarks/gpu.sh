#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the tests marked gpu, then benchmarks/gpu.py (zen-eco-4b bf16 and
# INT4, CUDA graphs on and off, transformers beside it). Extra arguments go to gpu.py; results are
# written to $OUT/gpu.json (OUT defaults to the current directory).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_graphs.py tests/test_dtypes_devices.py tests/test_quantize.py
python3 benchmarks/gpu.py --hf --micro --profile --compile bf16,int4-g128 --json "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/gpu.log"
