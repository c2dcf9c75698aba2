#!/usr/bin/env bash
# The main job on an embedded default: the bundled PyTorch checkpoint
# examples/tiny_mlp.pt (a pickle) is scanned, converted to safetensors without
# ever being unpickled, then the result is inspected, verified and compared
# tensor by tensor with the original.
#   scripts/demo.sh [CHECKPOINT.pt] [OUT.safetensors]
set -euo pipefail
cd "$(dirname "$0")/.."
input=${1:-examples/tiny_mlp.pt}
out=${2:-target/demo/tiny_mlp.safetensors}
mkdir -p "$(dirname "$out")"
cargo build --release -q -p tensafe-cli
tensafe=target/release/tensafe

echo "== scan: what would loading this pickle import and call?"
$tensafe scan "$input"
echo
echo "== convert: parse the pickle (never execute it) and write safetensors"
$tensafe convert --keep-metadata "$input" "$out"
echo
echo "== inspect"
$tensafe inspect "$out"
echo
echo "== verify: full validation and a read of every byte"
$tensafe verify "$out"
echo
echo "== diff: the converted tensors against the original checkpoint"
$tensafe diff "$input" "$out"
