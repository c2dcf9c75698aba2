#!/usr/bin/env bash
# One command for a GPU machine (torch with CUDA and safetensors==0.8.0
# installed, no network needed): builds the extension, runs the CUDA tests,
# then the GPU benchmark. Results go to stdout (and $OUT/gpu_bench.txt if set).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --no-build-isolation --no-deps ./python 2>/dev/null || maturin develop --release -q -m python/Cargo.toml
python -m pytest -q python/tests/test_load.py -k cuda -rs
python bench/gpu_bench.py "$@" | tee "${OUT:-/tmp}/gpu_bench.txt"
