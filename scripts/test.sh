#!/usr/bin/env bash
# Run the test suite in the environments scripts/install.sh built (each run prints its 25 slowest tests):
#
#   1. the core suite (everything but tests/test_vllm*.py) on torch 2.10.0, in .venv;
#   2. the vLLM tests (tests/test_vllm*.py) on torch 2.11.0 + vLLM 0.23.0 (CPU build), in .venv-vllm.
#
# The core suite runs once, on the torch vLLM-Ascend 0.23 runs on; the vLLM environment runs only
# what needs vLLM. The two phases run side by side: on a 2-core machine each keeps about 1.5 cores
# busy (ranks wait for each other, engines start up), together both. The core suite's output comes
# as it runs; the vLLM tests' goes to .test-logs/vllm.log (follow it with tail -f) and is printed
# when both are done. SEQUENTIAL=1 runs them one after the other, both printing as they run. Each
# phase prints its seconds.
#
# Extra arguments go to both pytest runs (e.g. -k, -x). A run that collects no test fails (pytest
# exit 5). The one exception: extra arguments that deselect every test of one phase (e.g. a -k that
# matches only core tests), if that phase's files do collect tests without them and the other
# phase ran some.
set -euo pipefail
cd "$(dirname "$0")/.."

total=$SECONDS
run() {  # $1 what, $2 venv, $3 the phase's own pytest arguments (one word), then the extra ones.
    # Returns 0 (passed), 100 (the extra arguments selected none of this phase's tests) or pytest's failure code.
    local what="$1" venv="$2" own="$3" start=$SECONDS rc=0
    shift 3
    echo "== $what: $("$venv/bin/python" -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}")') ($venv)"
    # shellcheck disable=SC2086  # $own: a glob or an option, expanded here
    "$venv/bin/python" -m pytest --durations=25 $own "$@" || rc=$?
    echo "== $what: $((SECONDS - start)) s (pytest exit $rc)"
    # shellcheck disable=SC2086
    if [ "$rc" -eq 5 ] && [ $# -gt 0 ] && "$venv/bin/python" -m pytest -q --collect-only $own >/dev/null; then
        echo "== $what: the extra arguments selected no test here"
        return 100
    fi
    return "$rc"
}

core=0
vllm=0
if [ "${SEQUENTIAL:-0}" = 1 ]; then
    run "core suite on torch 2.10.0" .venv "--ignore-glob=tests/test_vllm*" "$@" || core=$?
    run "vLLM tests on torch 2.11.0 + vLLM 0.23.0" .venv-vllm "tests/test_vllm*.py" "$@" || vllm=$?
else
    mkdir -p .test-logs
    log=.test-logs/vllm.log
    echo "== the vLLM tests run beside the core suite; their output: $log"
    run "vLLM tests on torch 2.11.0 + vLLM 0.23.0" .venv-vllm "tests/test_vllm*.py" "$@" >"$log" 2>&1 &
    pid=$!
    run "core suite on torch 2.10.0" .venv "--ignore-glob=tests/test_vllm*" "$@" || core=$?
    wait "$pid" || vllm=$?
    cat "$log"
fi
echo "== scripts/test.sh: $((SECONDS - total)) s"
for rc in "$core" "$vllm"; do
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 100 ]; then
        exit "$rc"
    fi
done
if [ "$core" -eq 100 ] && [ "$vllm" -eq 100 ]; then
    echo "scripts/test.sh: no test selected in either environment" >&2
    exit 5
fi
