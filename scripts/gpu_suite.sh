#!/usr/bin/env bash
# GPU verification of this tree on one CUDA/ROCm GPU: the GPU test tier (pytest -m gpu), the
# command-line check, and (on CUDA, when compute-sanitizer is on the PATH) memcheck over the
# kernel tests with one device allocation per buffer, so that an out-of-bounds access lands
# outside every allocation. Logs go to $OUT (default ./gpu-out).
#   scripts/gpu_suite.sh [tests|check|memcheck|all] [pytest -k expression for memcheck]
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-gpu-out}"; mkdir -p "$out"
what="${1:-all}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
py="${PYTHON:-python3}"
status=0

run_memcheck() {
    command -v compute-sanitizer >/dev/null || { echo "memcheck: no compute-sanitizer" | tee "$out/memcheck.log"; return 1; }
    XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_FLAGS="--xla_gpu_autotune_level=0" \
    timeout "${MEMCHECK_TIMEOUT:-480}" compute-sanitizer --tool memcheck --target-processes all \
        --print-limit 20 --error-exitcode 99 \
        "$py" -m pytest -q -p no:cacheprovider -m gpu -x ${MEMCHECK_TESTS:-tests/test_gemm.py tests/test_moe.py tests/test_moe_grad.py tests/test_alignment.py tests/test_routing.py} \
        ${2:+-k "$2"} >"$out/memcheck.log" 2>&1
    local rc=$?
    echo "memcheck rc=$rc"; grep -E "ERROR SUMMARY|passed|failed" "$out/memcheck.log" | tail -5
    return $rc
}

if [[ $what == memcheck || $what == all ]]; then
    run_memcheck "$@" & mpid=$!
fi
if [[ $what == tests || $what == all ]]; then
    timeout "${TESTS_TIMEOUT:-420}" "$py" -m pytest -q -p no:cacheprovider -m gpu -n "${WORKERS:-6}" tests/ \
        >"$out/tests.log" 2>&1 || status=1
    tail -25 "$out/tests.log"
fi
if [[ $what == check || $what == all ]]; then
    timeout 300 "$py" -m jaxmoe check >"$out/check.log" 2>&1 || status=1
    tail -25 "$out/check.log"
fi
if [[ -n ${mpid:-} ]]; then wait "$mpid" || status=1; fi
exit $status
