#!/usr/bin/env bash
# Runs every test: Rust unit, differential and CLI tests, the Python suite
# (against the reference implementation installed side by side), and a short
# fuzzing run. Sets up what it needs first (idempotent).
#   FUZZ_SECONDS=N  seconds per fuzz target (default 20; 0 skips fuzzing)
set -euo pipefail
cd "$(dirname "$0")/.."

# Free disk, for the record: the suite writes GiB-sized files, and SeaweedFS
# refuses writes when its disk runs low.
echo "== Disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free here, $(df -h --output=avail "${TMPDIR:-/tmp}" | tail -1 | tr -d ' ') in ${TMPDIR:-/tmp}"

if [ -n "${CI:-}" ]; then
  # One build from scratch: incremental data would only take disk and time.
  export CARGO_INCREMENTAL=0
fi
export CARGO_NET_RETRY=${CARGO_NET_RETRY:-10}

echo "== Python environment"
scripts/python-env.sh
. .venv/bin/activate

echo "== System packages"
scripts/system-deps.sh

echo "== Python lint (undefined, unused and shadowed names)"
flake8 --select F bench python/tensafe python/tests

echo "== Rust tests"
cargo test --workspace --exclude tensafe-python

echo "== Python extension (release build)"
maturin develop --release -q -m python/Cargo.toml

echo "== Python tests"
python -m pytest python/tests -q

if [ "${FUZZ_SECONDS:-20}" != 0 ]; then
  echo "== Fuzzing (${FUZZ_SECONDS:-20}s per target)"
  scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
fi
echo "== all tests passed"
