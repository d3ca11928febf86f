#!/usr/bin/env bash
# GPU check of vtr.kernels (Triton vs torch fallbacks, then `vtr bench kernels`), <= 5 minutes in total.
# Run from anywhere on a CUDA machine; results go to $OUT (default bench_out/gpu_kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-bench_out/gpu_kernels}"
mkdir -p "$OUT"
# vtr.kernels lives in kernels/ and is mapped by the package install: install editable if needed (offline).
if ! python -c "import vtr.kernels, vtr.bench.kernels" 2>/dev/null; then
    pip install --quiet --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1 || true
# Hard cap: the whole check must fit in 5 minutes even if something hangs.
timeout 290 python scripts/gpu_kernels_check.py "$@" 2>&1 | tee "$OUT/check.log"
exit "${PIPESTATUS[0]}"
