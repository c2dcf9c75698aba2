#!/usr/bin/env bash
# Prints one hash of everything the Python wheel is built from (the Rust and
# Python sources of the library, not its tests, and the manifests), so that
# bench/gpu_bench.sh can tell whether a prebuilt wheel matches the sources
# beside it. File times are no guide: copies to another machine change them.
set -euo pipefail
cd "$(dirname "$0")/.."
find python/src python/tensafe crates Cargo.toml Cargo.lock \
  \( -name tests -o -name __pycache__ \) -prune -o \
  -type f \( -name '*.rs' -o -name '*.py' -o -name '*.pyi' -o -name Cargo.toml -o -name Cargo.lock \) -print |
  LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1
