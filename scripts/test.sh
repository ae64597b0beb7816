#!/usr/bin/env bash
# Run the test suite in the environments scripts/install.sh built:
#
#   1. the core suite (everything but tests/test_vllm*.py) on torch 2.10.0, in .venv;
#   2. the whole suite on torch 2.11.0 + vLLM 0.23.0 (CPU build), in .venv-vllm.
#
# Extra arguments go to both pytest runs (e.g. -k, -x). A run that collects no test fails.
set -euo pipefail
cd "$(dirname "$0")/.."

run() {  # $1 venv, then pytest arguments
    local venv="$1"; shift
    echo "== $("$venv/bin/python" -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}")') ($venv)"
    "$venv/bin/python" -m pytest "$@"
}

start=$SECONDS
run .venv --ignore-glob='tests/test_vllm*' "$@"
echo "== core suite on torch 2.10.0: $((SECONDS - start)) s"
start=$SECONDS
run .venv-vllm "$@"
echo "== whole suite on torch 2.11.0 + vLLM 0.23.0: $((SECONDS - start)) s"
