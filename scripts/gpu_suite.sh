#!/usr/bin/env bash
# GPU verification of this tree on one CUDA/ROCm GPU: the GPU test tier (pytest -m gpu), the
# command-line check, and (on CUDA, when compute-sanitizer is on the PATH) memcheck over the
# kernel tests with one device allocation per buffer, so that an out-of-bounds access lands
# outside every allocation. Logs go to $OUT (default ./gpu-out).
#   scripts/gpu_suite.sh [tests|check|memcheck|all]
# Environment: TESTS_FILE (test ids, one a line; default all of tests/), MEMCHECK_TESTS (files),
# MEMCHECK_K (a pytest -k expression), WORKERS, *_TIMEOUT.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-gpu-out}"; mkdir -p "$out"
what="${1:-all}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# each pytest worker gives memory back as it frees it: workers side by side do not hoard the card
export XLA_PYTHON_CLIENT_ALLOCATOR="${XLA_PYTHON_CLIENT_ALLOCATOR:-platform}"
py="${PYTHON:-python3}"
status=0

run_memcheck() {
    # The CPU test tier (its adversarial inputs: invalid ids, empty experts, M = 1, NaN
    # rows, poisoned outputs) with JAX on the CPU and every kernel launch run compiled on
    # this GPU (JAXMOE_CPU_LAUNCH=gpu, jaxmoe/backends/cuda_host.py), one allocation per
    # array, under compute-sanitizer's memcheck. One sanitizer per pytest worker.
    command -v compute-sanitizer >/dev/null || { echo "memcheck: no compute-sanitizer" | tee "$out/memcheck.log"; return 1; }
    JAX_PLATFORMS=cpu JAXMOE_CPU_LAUNCH=gpu PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    timeout "${MEMCHECK_TIMEOUT:-480}" compute-sanitizer --tool memcheck --target-processes all \
        --print-limit 50 --error-exitcode 99 \
        "$py" -m pytest -q -p no:cacheprovider -n "${MEMCHECK_WORKERS:-6}" -m "not gpu" \
        ${MEMCHECK_TESTS:-$(ls tests/test_{gemm,moe,moe_grad,alignment,routing,route_align,layer,decode,moe_features,op_grads,quant}*.py 2>/dev/null | sort -u)} \
        -k "${MEMCHECK_K:-Triton or triton or kernel}" >"$out/memcheck.log" 2>&1
    local rc=$?
    echo "memcheck rc=$rc: $(grep -c 'ERROR SUMMARY: 0 errors' "$out/memcheck.log") processes with 0 errors," \
         "$(grep 'ERROR SUMMARY' "$out/memcheck.log" | grep -vc ' 0 errors') with errors; $(tail -1 "$out/memcheck.log")"
    return $rc
}

if [[ $what == memcheck || $what == all ]]; then
    run_memcheck & mpid=$!
fi
if [[ $what == check || $what == all ]]; then
    timeout 300 "$py" -m jaxmoe check >"$out/check.log" 2>&1 & cpid=$!
fi
if [[ $what == tests || $what == all ]]; then
    # SIGINT at the time limit: pytest stops and still prints the failures it has seen
    # shellcheck disable=SC2046
    timeout -s INT -k 60 "${TESTS_TIMEOUT:-420}" "$py" -m pytest -v -p no:cacheprovider -m gpu --tb=short \
        -n "${WORKERS:-8}" --dist loadgroup $(if [[ -n ${TESTS_FILE:-} ]]; then cat "$TESTS_FILE"; else echo tests/; fi) \
        >"$out/tests.log" 2>&1 || status=1
    grep -E "(FAILED|ERROR) " "$out/tests.log" | head -40; grep -c PASSED "$out/tests.log"; tail -1 "$out/tests.log"
fi
if [[ -n ${cpid:-} ]]; then wait "$cpid" || status=1; tail -12 "$out/check.log"; fi
if [[ -n ${mpid:-} ]]; then wait "$mpid" || status=1; fi
exit $status
