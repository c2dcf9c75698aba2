"""Converting a ≈1 GiB torch checkpoint: tensafe against copying the file and
against the usual torch.load + save_file route, median of `--reps`.

    .venv/bin/python bench/convert_bench.py [--gib 1.0] [--reps 5] [--dir DIR] [--baseline-exe OLD]

`--baseline-exe` also times another build of the CLI (e.g. one copied aside
before a change) in the same interleaved runs, so both see the same noise.

Each route writes a new file and fsyncs it, so all pay for durability. The
torch route is run on this benign file only as a peer: it unpickles.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch

import safetensors.torch as ref_pt

sys.path.insert(0, os.path.dirname(__file__))
from python_bench import model_like, run_interleaved, timed  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--baseline-exe", default=None, help="another tensafe binary to time side by side")
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "tensafe-cli"], cwd=REPO, check=True)
    # The binary cargo just built: honour CARGO_TARGET_DIR (worktrees share none).
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
    exe = os.path.join(target, "release", "tensafe")
    print(f"tensafe binary: {exe}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src = os.path.join(tmp, "model.pt")
        torch.save(model_like(args.gib), src)
        fsync(src)
        size = os.path.getsize(src)
        out = os.path.join(tmp, "out")

        def copy():
            shutil.copyfile(src, out)
            fsync(out)

        def converter(binary):
            return lambda: subprocess.run([binary, "convert", src, out], check=True, capture_output=True)

        def torch_route():
            ref_pt.save_file(torch.load(src, weights_only=True), out)
            fsync(out)

        cases = {"cp + fsync": copy, "tensafe convert": converter(exe)}
        if args.baseline_exe:
            cases["baseline convert"] = converter(args.baseline_exe)
        cases["torch.load + save_file"] = torch_route
        times = run_interleaved({name: functools.partial(timed, fn) for name, fn in cases.items()}, args.reps, after_each=lambda: os.remove(out))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{size / 2**30:.2f} GiB torch checkpoint, median of {args.reps}")
        for name, t in med.items():
            print(f"  {name:<24}{t:>7.3f} s  {size / t / 1e9:>5.2f} GB/s  {t / med['cp + fsync']:>5.2f}x the copy")


if __name__ == "__main__":
    main()
