#!/usr/bin/env bash
# One command for a GPU machine (torch with CUDA and safetensors==0.8.0
# installed, no network needed): installs tensafe, runs the CUDA tests, then
# the GPU benchmark. Arguments go to gpu_bench.py (e.g. --sweep).
# Results go to stdout and, when $OUT is set, to $OUT/gpu_tests.txt and
# $OUT/gpu_bench.txt.
#
# tensafe comes from a wheel in .whl/ when there is one (for GPU machines
# without Rust: build it elsewhere with
#   rm -rf .whl && maturin build --release --strip -m python/Cargo.toml -o .whl && bash bench/sources_hash.sh > .whl/SOURCES.sha256
# and carry .whl/ along; the wheel is abi3, for any CPython >= 3.11; one
# built from other sources is used with a warning), else it is built here.
# The tests are cut at 150 s and the benchmark at 380 s, so that everything
# fits a 10-minute device call.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
RESULTS=${OUT:-/tmp}
wheel=$(ls .whl/tensafe-*.whl 2>/dev/null | head -n 1)
if [ -n "$wheel" ]; then
  if [ "$(cat .whl/SOURCES.sha256 2>/dev/null)" != "$(bash bench/sources_hash.sh)" ]; then
    echo "WARNING: $wheel was not built from these sources (or has no .whl/SOURCES.sha256): the results are of that build"
  fi
  rm -rf /tmp/tensafe-site
  "$PY" -m pip install -q --no-deps --no-index --target /tmp/tensafe-site "$wheel" || exit 1
  export PYTHONPATH=/tmp/tensafe-site
elif command -v maturin >/dev/null; then
  maturin develop --release -q -m python/Cargo.toml || exit 1
else
  echo "no wheel in .whl/ and no maturin to build one: build the wheel on a machine with Rust (see the top of $0) and carry .whl/ along"
  exit 1
fi
"$PY" -c 'import tensafe; print("tensafe from", tensafe.__file__)' || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# A kernel of 4.4.0 is gVisor (page-cache figures unreliable); a CUDA stub
# library on the path would shadow the driver.
echo "kernel $(uname -r); LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
case "${LD_LIBRARY_PATH:-}" in *stubs*) echo "WARNING: a CUDA stubs folder is on LD_LIBRARY_PATH";; esac
# Cold rows mean something only on a disk (not tmpfs).
df -T "${TMPDIR:-/tmp}" | tail -n 1

# Bounded, so that a stuck driver cannot hold the GPU machine.
timeout 150 "$PY" -m pytest -q -p no:cacheprovider python/tests/test_cuda.py python/tests/test_load.py -rs 2>&1 | tee "$RESULTS/gpu_tests.txt"
tests=${PIPESTATUS[0]}
PYTHONUNBUFFERED=1 timeout 380 "$PY" bench/gpu_bench.py "$@" 2>&1 | tee "$RESULTS/gpu_bench.txt"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
