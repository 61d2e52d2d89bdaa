#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (H200, no internet, torch/triton preinstalled): build the extension
# with the CUDA kernel, run every GPU test, time each GPU backend's kernels and the API's host overhead, run every
# CUDA kernel path under compute-sanitizer, run the GPU benchmark, and print a short summary last.
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh           (or: make gpu-check)
#   STAGES="build tests" OUT=... bash benchmarks/gpu_check.sh    (a rerun of some stages; build is needed once)
#   GIT_COMMIT=$(git rev-parse --short HEAD) ...                  (recorded in the results; the copy has no .git)
#   GPU_TESTS_K="..." GPU_TESTS_CAP_S=300 ...                      (the tests stage's -k selection and time cap)
#
# Stages: env wheels build tests kernels bench sanitize (the default, in this order) and e2e (the end-to-end
# training comparison on the GPU, run after kernels; not in the default set). GPU_CHECK_BUDGET_S (default 540) bounds
# the whole run: before each timed stage, the time left is split among it and the selected stages still to come in
# proportion to their caps (build 240 s, tests GPU_TESTS_CAP_S, kernels 120, e2e 150, bench 150, sanitize 90; see
# gpu_check_budget.sh), each at most its cap, so the stages never add up to more than the budget and time one leaves
# unused goes to the later ones; a stage whose share is under 20 s is skipped. A stage stopped at its share gets
# SIGINT first, so pytest still writes its report. Exit status: 0, or the first failing stage's (a stage stopped by
# its share gives 4, never the 124/137 that reads as the whole run timing out).
#
# Every log and table is written to a work folder (GPU_CHECK_WORK, default /tmp/gpu_check, emptied at the start of
# each run, so that a rerun packs and summarizes its own logs only) as the stages go. After each stage (and on exit)
# they are packed into $OUT/gpu_check.tgz, and the few files worth reading first are copied beside it: the device
# tool brings back at most 8 files from $OUT, and what is there even when it stops a run at its limit. Wheels found
# in .whl/ (e.g. liger-kernel, for the benchmark's Liger peer) are installed to a scratch folder first.
# pytest-xdist and pytest-timeout are used when the machine has them.
set -uo pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
# A rerun on the same machine starts clean: no log or table of an earlier run is packed, copied or summarized as its
# own. Only a work folder this script made (it leaves a marker file there) is emptied, and in $OUT only the files
# pack writes there are removed (OUT may well be benchmarks/results, with committed tables beside them).
if [ -d "$WORK" ] && [ ! -e "$WORK/.gpu_check_work" ] && [ -n "$(ls -A "$WORK")" ]; then
  echo "gpu_check.sh: GPU_CHECK_WORK=$WORK is a folder this script did not make; name a new or empty one" >&2
  exit 2
fi
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK"
touch "$WORK/.gpu_check_work"
rm -f "$OUT"/{gpu_check.tgz,summary.txt,gpu_tests.log,gpu_kernel_table.md,host_overhead.md,sanitize.log,env.txt,bench.md}
PYTHON=${PYTHON:-python3}  # the lent GPU image has python3 only
STAGES=${STAGES:-env wheels build tests kernels bench sanitize}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
START=$(date +%s)
STATUS=0
source benchmarks/gpu_check_budget.sh  # CAP, elapsed, wants, allowance

step() { echo; echo "=== $* (t=$(elapsed)s)"; }
# Whether a stage is selected and its share of the budget is at least 20 s (else it says so and is skipped).
runs() {
  wants "$1" || return 1
  pack
  (( $(allowance "$1") >= 20 )) && return 0
  echo "=== $1: skipped, its share of the budget left is under 20 s (t=$(elapsed)s)" | tee -a "$WORK/stage_notes.txt"
  return 1
}
# A stage's exit status, kept if it is the first failure; a stage stopped at its allowance counts as 4.
record_failure() {
  local rc=$1
  (( rc == 124 || rc == 137 )) && rc=4
  (( rc != 0 && STATUS == 0 )) && STATUS=$rc
  return 0
}
# timeout that interrupts (SIGINT) first and kills 15 s later; the whole process group goes, xdist workers too.
capped() { local seconds=$1; shift; timeout -s INT -k 15 "$seconds" "$@"; }
has_module() { "$PYTHON" -c "import $1" 2>/dev/null; }

summary() {
  echo "GPU check $(date -u +%FT%TZ), commit ${GIT_COMMIT:-unknown}, stages: $STAGES, $(elapsed)s"
  cat "$WORK/stage_notes.txt" 2>/dev/null
  if [ -f "$WORK/gpu_tests.log" ]; then
    echo "GPU tests: $(grep -E '^[=]* ?[0-9]+ [a-z]+.* in [0-9.]+s' "$WORK/gpu_tests.log" | tail -1)"
    grep -E "^(FAILED|ERROR) " "$WORK/gpu_tests.log" | cut -c1-200 | head -15
  fi
  [ -f "$WORK/sanitize.log" ] && grep -E "ERROR SUMMARY|op calls|memcheck exit" "$WORK/sanitize.log"
  cat "$WORK/host_overhead.md" 2>/dev/null
  cat "$WORK/gpu_kernel_table.md" 2>/dev/null
}

pack() {
  summary > "$WORK/summary.txt" 2>&1
  tar czf "$OUT/gpu_check.tgz" -C "$WORK" . 2>/dev/null
  # At most 8 files come back: the archive and these.
  for name in summary.txt gpu_tests.log gpu_kernel_table.md host_overhead.md sanitize.log env.txt; do
    [ -f "$WORK/$name" ] && cp "$WORK/$name" "$OUT/"
  done
  local bench_md
  bench_md=$(ls -t "$WORK"/cuda-*.md 2>/dev/null | head -1)
  [ -n "$bench_md" ] && cp "$bench_md" "$OUT/bench.md"
}
trap pack EXIT

# Every core compiles (the Makefile's MAX_JOBS is sized for a 2-core dev machine).
export TORCH_CUDA_ARCH_LIST=9.0 FUSED_XENT_CUDA=1 FUSED_XENT_REQUIRE_EXTENSION=1 MAX_JOBS=${GPU_CHECK_JOBS:-$(nproc)}
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
    echo "cpus: $(nproc)"
  } 2>&1 | tee "$WORK/env.txt"
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

if runs build; then
  step "build (sm_90 only)"
  if ! capped "$(allowance build)" "$PYTHON" setup.py build_ext --inplace > "$WORK/build.log" 2>&1; then
    tail -40 "$WORK/build.log"
    echo "BUILD FAILED"
    exit 1
  fi
  grep -E "^fused_xent|CUDA|arch" "$WORK/build.log" | head -5 | tee -a "$WORK/env.txt"
fi
"$PYTHON" -c "import fused_xent; print('backends:', fused_xent.available_backends())" | tee -a "$WORK/env.txt"

if runs tests; then
  step "GPU tests (pytest -m cuda: the CUDA kernel, and every backend on CUDA tensors)"
  # -v: each outcome is logged as it happens, so a capped run still shows how far it got. Triton compiles one
  # kernel per specialization (CPU-bound), hence many workers, each on one thread. The Triton parity grid in
  # float16/float64 (half of all its compiles) is left to a later run: test_triton.py and the fuzzer cover them.
  PYTEST_ARGS=(-m cuda tests -p no:cacheprovider -o "addopts=" -ra -v --durations=10 --maxfail=40
               --hypothesis-seed=0 --junitxml="$WORK/gpu_tests.xml"
               -k "${GPU_TESTS_K:-not (test_matches_pytorch and cuda-triton and (torch.float16 or torch.float64))}")
  WORKERS=$(( $(nproc) - 2 ))
  # loadgroup: the tests of more than 2**31 elements (xdist_group "gpu_memory", 20-45 GiB each) run one at a time.
  has_module xdist && (( WORKERS > 1 )) && PYTEST_ARGS+=(-n "$WORKERS" --dist loadgroup)
  has_module pytest_timeout && PYTEST_ARGS+=(--timeout=120)
  OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 capped "$(allowance tests)" "$PYTHON" -m pytest \
    "${PYTEST_ARGS[@]}" > "$WORK/gpu_tests.log" 2>&1
  TEST_RC=$?
  grep -E "^(FAILED|ERROR) |^[=]* ?[0-9]+ [a-z]+.* in [0-9.]+s" "$WORK/gpu_tests.log" | cut -c1-200 | tail -20
  (( TEST_RC == 124 )) && echo "GPU tests stopped at their time cap (the log has every outcome up to then)"
  record_failure "$TEST_RC"
fi

if runs kernels; then
  step "kernel table (benchmarks/gpu_kernel_table.py), then the API's host overhead (benchmarks/host_overhead.py)"
  KERNELS_ALLOWANCE=$(allowance kernels)
  KERNELS_END=$(( $(date +%s) + KERNELS_ALLOWANCE ))
  capped "$KERNELS_ALLOWANCE" "$PYTHON" benchmarks/gpu_kernel_table.py --out "$WORK" > "$WORK/kernel_table.log" 2>&1
  KERNELS_RC=$?
  (( KERNELS_RC != 0 )) && echo "gpu_kernel_table.py exited with $KERNELS_RC (see kernel_table.log)" | tee -a "$WORK/stage_notes.txt"
  record_failure "$KERNELS_RC"
  # What is left of the stage's share; the table takes about 20 s of its 120 on an H200, this report about 15.
  OVERHEAD_ALLOWANCE=$(( KERNELS_END - $(date +%s) ))
  if (( OVERHEAD_ALLOWANCE >= 10 )); then
    capped "$OVERHEAD_ALLOWANCE" "$PYTHON" benchmarks/host_overhead.py --device cuda --out "$WORK" \
      > "$WORK/host_overhead.log" 2>&1
    OVERHEAD_RC=$?
    (( OVERHEAD_RC != 0 )) && echo "host_overhead.py exited with $OVERHEAD_RC (see host_overhead.log)" | tee -a "$WORK/stage_notes.txt"
    record_failure "$OVERHEAD_RC"
  else
    echo "host_overhead.py: skipped, ${OVERHEAD_ALLOWANCE}s of the kernels stage's share left" | tee -a "$WORK/stage_notes.txt"
  fi
fi

if runs e2e; then
  step "end-to-end training, fused vs PyTorch loss (benchmarks/e2e.py --device cuda)"
  capped "$(allowance e2e)" "$PYTHON" benchmarks/e2e.py --device cuda --out "$WORK" > "$WORK/e2e.log" 2>&1
  E2E_RC=$?
  (( E2E_RC != 0 )) && echo "e2e.py exited with $E2E_RC (see e2e.log)" | tee -a "$WORK/stage_notes.txt"
  record_failure "$E2E_RC"
  tail -8 "$WORK/e2e.log"
fi

if runs bench; then
  step "GPU benchmark (benchmarks/bench.py --device cuda)"
  # torch.compile is left out by default: its 20-40 s compile per problem would spend this stage's share on three
  # problems; the targets are against eager and Liger. So is the pure-PyTorch fused backend (a reference, not a
  # peer). BENCH_ARGS="" brings the default set back (or e.g. "--full").
  read -r -a BENCH_EXTRA <<< "${BENCH_ARGS---providers fused-cuda*,fused-triton,eager,liger}"
  capped "$(allowance bench)" "$PYTHON" benchmarks/bench.py --device cuda --budget 0.5 --out "$WORK" \
    "${BENCH_EXTRA[@]}" > "$WORK/bench.log" 2>&1
  BENCH_RC=$?
  (( BENCH_RC != 0 )) && echo "bench.py exited with $BENCH_RC (see bench.log)" | tee -a "$WORK/stage_notes.txt"
  record_failure "$BENCH_RC"
  tail -12 "$WORK/bench.log"
fi

if runs sanitize; then
  step "compute-sanitizer memcheck of every CUDA kernel path (benchmarks/gpu_sanitize.py)"
  SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  if [ -x "$SANITIZER" ]; then
    if [[ ${SANITIZE_BACKENDS:-cuda} == *triton* ]]; then
      # Under memcheck, the Triton backend spent its whole 90 s share compiling kernels (2026-11-30): the same calls
      # outside it first leave every kernel in Triton's cache, which the checked run then loads (same allocator, so
      # the same pointer alignments, which Triton specializes on).
      # Half the stage's share: what the warm-up leaves goes to memcheck.
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 capped "$(( $(allowance sanitize) / 2 ))" "$PYTHON" benchmarks/gpu_sanitize.py \
        --backends triton > "$WORK/sanitize_warmup.log" 2>&1
      echo "Triton kernels compiled outside memcheck, exit status $? (t=$(elapsed)s)" | tee -a "$WORK/stage_notes.txt"
    fi
    MEMCHECK_ALLOWANCE=$(allowance sanitize)  # timeout would read 0 as no limit at all, and refuse a negative one
    if (( MEMCHECK_ALLOWANCE < 20 )); then
      echo "=== memcheck: skipped, ${MEMCHECK_ALLOWANCE} s of the budget left for it (t=$(elapsed)s)" \
        | tee -a "$WORK/stage_notes.txt"
    else
      # Without PyTorch's caching allocator every tensor is its own allocation, so an access past a tensor's end is
      # an access past an allocation, which memcheck sees. Only memory errors count (not CUDA API errors that torch
      # handles), and only in this process (not in the compilers it starts).
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 capped "$MEMCHECK_ALLOWANCE" "$SANITIZER" --tool memcheck --error-exitcode 3 \
        --report-api-errors no --target-processes application-only --print-limit 20 \
        "$PYTHON" benchmarks/gpu_sanitize.py --backends "${SANITIZE_BACKENDS:-cuda}" > "$WORK/sanitize.log" 2>&1
      SANITIZE_RC=$?
      echo "memcheck exit status: $SANITIZE_RC" >> "$WORK/sanitize.log"
      tail -6 "$WORK/sanitize.log"
      (( SANITIZE_RC == 124 )) && echo "memcheck stopped at its time cap: no verdict"
      record_failure "$SANITIZE_RC"
    fi
  else
    echo "compute-sanitizer not found; skipped"
  fi
fi

step "summary"
summary
exit "$STATUS"
