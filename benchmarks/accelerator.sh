#!/usr/bin/env bash
# The accelerator benchmark in one command, on a fresh CUDA 12 machine with Python >= 3.11:
# installs the package with the CUDA build of jax 0.10.2 (`jax[cuda12]` pulls the CUDA 12
# libraries as wheels) and PyTorch (the PyPI Linux wheel is the CUDA build), then runs both
# shapes and writes benchmarks/results/accelerator_gpu.json. Extra arguments go to the script.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[test]' 'jax[cuda12]==0.10.2'
python benchmarks/accelerator.py "$@"
