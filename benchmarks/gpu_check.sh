#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (H200, no internet, nothing preinstalled but torch/triton):
# build the extension with the CUDA kernel, run the CUDA-marked tests, run the GPU benchmark, time the CUDA ops,
# and print a short table last. Everything goes to $OUT. Budget: well under 10 minutes.
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh        (or: make gpu-check)
set -euo pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}  # the lent GPU image has python3 only
START=$(date +%s)
step() { echo; echo "=== $* (t=$(( $(date +%s) - START ))s)"; }

step "environment"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name())"
  "$PYTHON" -c "import triton; print('triton', triton.__version__)" || true
  command -v nvcc || ls /usr/local/cuda/bin/nvcc || true
} 2>&1 | tee "$OUT/env.txt"

step "build (sm_90 only)"
export TORCH_CUDA_ARCH_LIST=9.0 FUSED_XENT_CUDA=1 FUSED_XENT_REQUIRE_EXTENSION=1 MAX_JOBS=16
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
"$PYTHON" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
tail -3 "$OUT/build.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import fused_xent; print('backends:', fused_xent.available_backends())" | tee -a "$OUT/env.txt"

step "CUDA tests"
set +e
timeout 240 "$PYTHON" -m pytest -m cuda tests -q -rs -p no:cacheprovider --durations=8 \
  --junitxml="$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.log"
TEST_RC=${PIPESTATUS[0]}
step "Triton tests on CUDA tensors"
timeout 150 "$PYTHON" -m pytest tests/test_triton.py -q -rs -p no:cacheprovider --durations=5 2>&1 \
  | tee "$OUT/triton_tests.log"
TRITON_RC=${PIPESTATUS[0]}
[ "$TEST_RC" -eq 0 ] && TEST_RC=$TRITON_RC
set -e

step "GPU benchmark (benchmarks/bench.py)"
if [ -f benchmarks/bench.py ]; then
  timeout 150 "$PYTHON" benchmarks/bench.py --device cuda --out "$OUT" > "$OUT/bench.log" 2>&1 \
    || echo "bench.py exited with $? (see bench.log)"
  tail -30 "$OUT/bench.log"
else
  echo "benchmarks/bench.py not present; skipped"
fi

step "CUDA kernel table"
timeout 90 "$PYTHON" benchmarks/gpu_kernel_table.py --out "$OUT" > "$OUT/kernel_table.log" 2>&1 \
  || echo "gpu_kernel_table.py exited with $? (see kernel_table.log)"

step "summary"
echo "CUDA tests: $(grep -E '(passed|failed|error)' "$OUT/cuda_tests.log" | tail -1)"
echo "Triton tests: $(grep -E '(passed|failed|error)' "$OUT/triton_tests.log" | tail -1) (exit $TEST_RC)"
cat "$OUT/cuda_kernel_table.md" 2>/dev/null || tail -20 "$OUT/kernel_table.log"
echo "total $(( $(date +%s) - START ))s; results in $OUT"
exit "$TEST_RC"
