#!/usr/bin/env bash
# One command for a GPU machine (torch with CUDA and safetensors==0.8.0
# installed, no network needed): installs tensafe, runs the CUDA tests, then
# the GPU benchmark. Arguments go to gpu_bench.py (e.g. --sweep).
# Results go to stdout and, when $OUT is set, to $OUT/gpu_tests.txt and
# $OUT/gpu_bench.txt.
#
# tensafe comes from a wheel in .whl/ when there is one (for GPU machines
# without Rust: build it elsewhere with
#   rm -rf .whl && maturin build --release -m python/Cargo.toml -o .whl
# — the wheel is abi3, for any CPython >= 3.11; one older than the sources
# is refused), else it is built here. The benchmark is cut at 420 s.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
RESULTS=${OUT:-/tmp}
wheel=$(ls .whl/tensafe-*.whl 2>/dev/null | head -n 1)
if [ -n "$wheel" ] && [ -n "$(find python/src python/tensafe crates -newer "$wheel" \( -name '*.rs' -o -name '*.py' \) -print -quit)" ]; then
  echo "stale wheel: $wheel is older than the sources; rebuild it (maturin build --release -m python/Cargo.toml -o .whl)"
  exit 1
fi
if [ -n "$wheel" ]; then
  rm -rf /tmp/tensafe-site
  "$PY" -m pip install -q --no-deps --no-index --target /tmp/tensafe-site "$wheel" || exit 1
  export PYTHONPATH=/tmp/tensafe-site
else
  maturin develop --release -q -m python/Cargo.toml || exit 1
fi
"$PY" -c 'import tensafe; print("tensafe from", tensafe.__file__)' || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# Cold rows mean something only on a disk (not tmpfs).
df -T "${TMPDIR:-/tmp}" | tail -n 1

# Bounded, so that a stuck driver cannot hold the GPU machine.
timeout 150 "$PY" -m pytest -q -p no:cacheprovider python/tests/test_cuda.py python/tests/test_load.py -rs 2>&1 | tee "$RESULTS/gpu_tests.txt"
tests=${PIPESTATUS[0]}
PYTHONUNBUFFERED=1 timeout 420 "$PY" bench/gpu_bench.py "$@" 2>&1 | tee "$RESULTS/gpu_bench.txt"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
