#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (H200, no internet, torch/triton preinstalled): build the extension
# with the CUDA kernel, run every GPU test, time each GPU backend's kernels, run every kernel path under
# compute-sanitizer, run the GPU benchmark, and print a short summary last. Everything goes to $OUT; each stage writes as it
# goes, so a run cut short still leaves its results.
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh           (or: make gpu-check)
#   STAGES="build tests" OUT=... bash benchmarks/gpu_check.sh    (a rerun of some stages; build is needed once)
#   GIT_COMMIT=$(git rev-parse --short HEAD) ...                  (recorded in the results; the copy has no .git)
#
# Stages: env wheels build tests kernels sanitize bench (the default, in this order: the benchmark, which writes
# after every problem, takes what is left of the budget) and e2e (the end-to-end training comparison on the GPU;
# not in the default set).
# GPU_CHECK_BUDGET_S (default 540) bounds the whole run: each stage gets its own cap or what is left, whichever is
# less. Wheels found in .whl/ (e.g. liger-kernel, for the benchmark's Liger peer) are installed to a scratch
# folder first. pytest-xdist and pytest-timeout are used when the machine has them.
set -uo pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}  # the lent GPU image has python3 only
STAGES=${STAGES:-env wheels build tests kernels sanitize bench}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
START=$(date +%s)
STATUS=0

elapsed() { echo $(( $(date +%s) - START )); }
step() { echo; echo "=== $* (t=$(elapsed)s)"; }
wants() { [[ " $STAGES " == *" $1 "* ]]; }
# Seconds a stage may run: its cap, or the budget left minus a reserve for the summary.
allowance() {
  local left=$(( BUDGET - $(elapsed) - 10 ))
  (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo "$1"
}
has_module() { "$PYTHON" -c "import $1" 2>/dev/null; }

export TORCH_CUDA_ARCH_LIST=9.0 FUSED_XENT_CUDA=1 FUSED_XENT_REQUIRE_EXTENSION=1 MAX_JOBS=${MAX_JOBS:-16}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if wants env; then
  step "environment"
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
    "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'device', torch.cuda.get_device_name())"
    "$PYTHON" -c "import triton; print('triton', triton.__version__)" || true
    command -v nvcc || ls /usr/local/cuda/bin/nvcc || true
    for module in xdist pytest_timeout; do has_module "$module" && echo "pytest plugin: $module"; done
  } 2>&1 | tee "$OUT/env.txt"
fi

if wants wheels && compgen -G ".whl/*.whl" > /dev/null; then
  step "wheels from .whl/"
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
    ls .whl
  else
    echo "wheel install failed; going on without them"
  fi
elif [ -d /tmp/site ]; then
  export PYTHONPATH="$PYTHONPATH:/tmp/site"  # installed by an earlier run on this machine
fi

if wants build; then
  step "build (sm_90 only)"
  if ! timeout "$(allowance 240)" "$PYTHON" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    echo "BUILD FAILED"
    exit 1
  fi
  grep -E "^fused_xent|CUDA|arch" "$OUT/build.log" | head -5
fi
"$PYTHON" -c "import fused_xent; print('backends:', fused_xent.available_backends())" | tee -a "$OUT/env.txt"

if wants tests; then
  step "GPU tests (pytest -m cuda: the CUDA kernel, and every backend on CUDA tensors)"
  PYTEST_ARGS=(-m cuda tests -p no:cacheprovider --durations=10 --maxfail=40 --junitxml="$OUT/gpu_tests.xml")
  has_module xdist && PYTEST_ARGS+=(-n 8)
  has_module pytest_timeout && PYTEST_ARGS+=(--timeout=240)
  timeout "$(allowance 210)" "$PYTHON" -m pytest "${PYTEST_ARGS[@]}" > "$OUT/gpu_tests.log" 2>&1
  TEST_RC=$?
  tail -25 "$OUT/gpu_tests.log"
  (( TEST_RC != 0 )) && STATUS=$TEST_RC
fi

if wants kernels; then
  step "kernel table (benchmarks/gpu_kernel_table.py)"
  timeout "$(allowance 75)" "$PYTHON" benchmarks/gpu_kernel_table.py --out "$OUT" > "$OUT/kernel_table.log" 2>&1 \
    || echo "gpu_kernel_table.py exited with $? (see kernel_table.log)"
fi


if wants e2e; then
  step "end-to-end training, fused vs PyTorch loss (benchmarks/e2e.py --device cuda)"
  timeout "$(allowance 150)" "$PYTHON" benchmarks/e2e.py --device cuda --out "$OUT" > "$OUT/e2e.log" 2>&1 \
    || echo "e2e.py exited with $? (see e2e.log)"
  tail -8 "$OUT/e2e.log"
fi

if wants sanitize; then
  step "compute-sanitizer memcheck of every kernel path (benchmarks/gpu_sanitize.py)"
  SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  if [ -x "$SANITIZER" ]; then
    # Without PyTorch's caching allocator every tensor is its own allocation, so an access past a tensor's end is
    # an access past an allocation, which memcheck sees.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(allowance 90)" "$SANITIZER" --tool memcheck --error-exitcode 3 \
      --print-limit 20 "$PYTHON" benchmarks/gpu_sanitize.py > "$OUT/sanitize.log" 2>&1
    SANITIZE_RC=$?
    tail -8 "$OUT/sanitize.log"
    echo "memcheck exit status: $SANITIZE_RC"
    (( SANITIZE_RC != 0 && STATUS == 0 )) && STATUS=$SANITIZE_RC
  else
    echo "compute-sanitizer not found; skipped"
  fi
fi

if wants bench; then
  step "GPU benchmark (benchmarks/bench.py --device cuda)"
  timeout "$(allowance 400)" "$PYTHON" benchmarks/bench.py --device cuda --budget 0.5 --out "$OUT" \
    > "$OUT/bench.log" 2>&1 || echo "bench.py exited with $? (see bench.log)"
  tail -12 "$OUT/bench.log"
fi

step "summary"
if [ -f "$OUT/gpu_tests.log" ]; then
  echo "GPU tests: $(grep -E '^[=]* ?[0-9]+ [a-z]+.* in [0-9.]+s' "$OUT/gpu_tests.log" | tail -1)"
  grep -E "^(FAILED|ERROR) " "$OUT/gpu_tests.log" | cut -c1-200 | head -15
fi
cat "$OUT/gpu_kernel_table.md" 2>/dev/null || tail -5 "$OUT/kernel_table.log" 2>/dev/null
echo "total $(elapsed)s; results in $OUT"
exit "$STATUS"
