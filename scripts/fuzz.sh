#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a while; fails if any finds a crash.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 30)
#
# Works on the stable toolchain: libFuzzer's compiler flags are unlocked with
# RUSTC_BOOTSTRAP=1. Installs cargo-fuzz when it is missing. Each target starts
# from its committed seeds (fuzz/seeds/<target>, never written to) plus what
# earlier runs found (fuzz/corpus/<target>, git-ignored); crashing inputs land
# in fuzz/artifacts/<target>/. Set CARGO_BUILD_JOBS to limit build parallelism.
set -euo pipefail

seconds=${1:-30}
if ! [[ $seconds =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
    echo "usage: $0 [SECONDS_PER_TARGET]  (a positive integer, default 30)" >&2
    exit 2
fi

cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

# Build every target before running any, so a build error fails fast.
cargo fuzz build

failed=()
for target in $(cargo fuzz list); do
    corpus=fuzz/corpus/$target
    seeds=fuzz/seeds/$target
    mkdir -p "$corpus" "fuzz/artifacts/$target"
    dirs=("$corpus")
    [ -d "$seeds" ] && dirs+=("$seeds")
    args=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
    [ -f "fuzz/$target.dict" ] && args+=(-dict="fuzz/$target.dict")

    echo "fuzz.sh: $target for ${seconds}s" >&2
    before=$(ls "fuzz/artifacts/$target" | wc -l)
    # The first directory receives new inputs; the seeds are only read.
    if cargo fuzz run "$target" "${dirs[@]}" -- "${args[@]}"; then
        continue
    fi
    # A crash counts as found. A slow input (timeout-*) or a memory limit
    # (oom-*) counts when it happens again, alone, under the same limits: a
    # loaded machine can make a fast input slow once.
    artifact=$(ls -t "fuzz/artifacts/$target" | sed -n 1p)
    if [ "$(ls "fuzz/artifacts/$target" | wc -l)" -gt "$before" ] && [[ $artifact == timeout-* || $artifact == oom-* ]]; then
        echo "fuzz.sh: $target: $artifact; running it again alone" >&2
        if cargo fuzz run "$target" "fuzz/artifacts/$target/$artifact" -- -runs=1 -timeout=10 -rss_limit_mb=2048; then
            echo "fuzz.sh: $target: $artifact passed alone, not counted (kept in fuzz/artifacts/)" >&2
            continue
        fi
    fi
    failed+=("$target")
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: crash found in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz.sh: no crash in ${seconds}s per target" >&2
