#!/usr/bin/env bash
# The main job on an embedded default: build tensafe, write a sample
# checkpoint with the Rust writer, then inspect and verify it with the CLI.
#   scripts/demo.sh [OUT.safetensors]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/sample.safetensors}
cargo build --release -q -p tensafe-cli
cargo build --release -q -p tensafe --example write_sample
target/release/examples/write_sample "$out"
target/release/tensafe inspect "$out"
target/release/tensafe verify "$out"
