#!/usr/bin/env bash
# Run the test suite in the environments scripts/install.sh built (each run prints its 25 slowest tests):
#
#   1. the core suite (everything but tests/test_vllm*.py) on torch 2.10.0, in .venv;
#   2. the vLLM tests (tests/test_vllm*.py) on torch 2.11.0 + vLLM 0.23.0 (CPU build), in .venv-vllm.
#
# The core suite runs once, on the torch vLLM-Ascend 0.23 runs on; the vLLM environment runs only
# what needs vLLM. Each phase prints its seconds.
#
# Extra arguments go to both pytest runs (e.g. -k, -x). A run that collects no test fails (pytest
# exit 5). The one exception: extra arguments that deselect every test of one phase (e.g. a -k that
# matches only core tests), if that phase's files do collect tests without them and the other
# phase ran some.
set -euo pipefail
cd "$(dirname "$0")/.."

total=$SECONDS
empty=0
run() {  # $1 what, $2 venv, $3 the phase's own pytest arguments (one word), then the extra ones
    local what="$1" venv="$2" own="$3" start=$SECONDS rc=0
    shift 3
    echo "== $what: $("$venv/bin/python" -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}")') ($venv)"
    # shellcheck disable=SC2086  # $own: a glob or an option, expanded here
    "$venv/bin/python" -m pytest --durations=25 $own "$@" || rc=$?
    echo "== $what: $((SECONDS - start)) s (pytest exit $rc)"
    # shellcheck disable=SC2086
    if [ "$rc" -eq 5 ] && [ $# -gt 0 ] && "$venv/bin/python" -m pytest -q --collect-only $own >/dev/null; then
        echo "== $what: the extra arguments selected no test here"
        empty=$((empty + 1))
    elif [ "$rc" -ne 0 ]; then
        exit "$rc"
    fi
}

run "core suite on torch 2.10.0" .venv "--ignore-glob=tests/test_vllm*" "$@"
run "vLLM tests on torch 2.11.0 + vLLM 0.23.0" .venv-vllm "tests/test_vllm*.py" "$@"
echo "== scripts/test.sh: $((SECONDS - total)) s"
if [ "$empty" -eq 2 ]; then
    echo "scripts/test.sh: no test selected in either environment" >&2
    exit 5
fi
