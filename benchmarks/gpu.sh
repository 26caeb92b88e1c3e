#!/usr/bin/env bash
# Everything GPU in one command (benchmarks/gpu.py: kernel correctness, the kernel table, the
# Pallas tile sweep, training steps vs HF, memory vs the planner, decode vs HF generate), one
# JSON: benchmarks/results/gpu.json. Designed for < 8 minutes on one H100/H200 with NO network:
# it runs on the machine's own jax/torch/transformers (python3) with the repository on
# PYTHONPATH (nothing is built or installed from an index), plus the few wheels that image
# lacks, brought along in .whl/ (see --fetch-wheels). Extra arguments go to gpu.py.
#
#   bash benchmarks/gpu.sh --fetch-wheels   # once, on a machine WITH network: wheels into .whl/
#   bash benchmarks/gpu.sh                  # on the GPU machine (.whl/ beside the repo's files)
#   bash benchmarks/gpu.sh --quick          # the CPU smoke run of the same script (tiny shapes)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# What the device image lacks that `alpaca_jax` imports (datasets, and its dill/multiprocess);
# versions as this repository's environment resolves them.
WHEELS=(datasets dill multiprocess)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .whl
    for name in "${WHEELS[@]}"; do
        version=$("$PYTHON" -m pip show "$name" | sed -n 's/^Version: //p')
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$name==$version"
    done
    ls .whl
    exit 0
fi

if ! "$PYTHON" -c 'import datasets' 2> /dev/null; then  # the device image: bring the carried wheels in
    if ! compgen -G ".whl/*.whl" > /dev/null; then
        echo "error: $PYTHON has no 'datasets' and there is no .whl/ (run: bash benchmarks/gpu.sh --fetch-wheels)" >&2
        exit 2
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_site .whl/*.whl
    export PYTHONPATH="/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PYTHON" -c 'import jax, torch, transformers; print("jax", jax.__version__, jax.devices()[0].device_kind, "| torch", torch.__version__, "| transformers", transformers.__version__)'
exec "$PYTHON" benchmarks/gpu.py "$@"
