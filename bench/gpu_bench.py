"""GPU loading benchmark: one command that builds, checks and measures.

    bash bench/gpu_bench.sh            # on a machine with CUDA, torch and safetensors==0.8.0

Writes a deterministic ≈4 GiB bf16 file, checks that tensafe's CUDA load is
bit-exact against the reference, then measures in one process, interleaved,
median of `--reps`:

- raw pinned host→device copy bandwidth (the PCIe/NVLink limit)
- raw parallel pread from the page cache and from disk (cold: posix_fadvise)
- tensafe `load_file(device="cuda:0")` warm and cold, mmap and pread backends
- reference `load_file(device="cuda:0")` warm and cold
- `torch.load(mmap=True)` then `.to("cuda:0")`, warm

and prints GB/s with ratios. Exits 2 when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from load_bench import raw_pread  # noqa: E402
from python_bench import evict, model_like  # noqa: E402


def sync() -> None:
    torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        sys.exit(2)

    import safetensors.torch as ref_pt
    import tensafe.torch as ts_pt

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path, pt_path = os.path.join(tmp, "big.safetensors"), os.path.join(tmp, "big.pt")
        tensors = model_like(args.gib)
        ts_pt.save_file(tensors, path)
        torch.save(tensors, pt_path)
        size = os.path.getsize(path)

        # Correctness first: bit-exact against the reference on the device.
        ours = ts_pt.load_file(path, device="cuda:0")
        theirs = ref_pt.load_file(path, device="cuda:0")
        for name in theirs:
            assert ours[name].device == theirs[name].device and torch.equal(ours[name], theirs[name]), name
        del ours, theirs, tensors
        torch.cuda.empty_cache()
        print(f"check: tensafe CUDA load is bit-exact against the reference ({size / 2**30:.2f} GiB)")

        pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        device_buf = torch.empty(size, dtype=torch.uint8, device="cuda:0")

        def cold(fn, target=path):
            def run():
                evict(target)
                return timed(fn)
            return run

        def warm(fn):
            def run():
                fn()
                return timed(fn)
            return run

        cases = {
            "raw pinned H2D copy": lambda: timed(lambda: device_buf.copy_(pinned, non_blocking=True)),
            "raw parallel pread, warm": warm(lambda: raw_pread(path, args.threads)),
            "raw parallel pread, cold": cold(lambda: raw_pread(path, args.threads)),
            "tensafe cuda (mmap), warm": warm(lambda: ts_pt.load_file(path, device="cuda:0")),
            "tensafe cuda (pread), warm": warm(lambda: ts_pt.load_file(path, device="cuda:0", backend="pread", threads=args.threads)),
            "tensafe cuda (pread), cold": cold(lambda: ts_pt.load_file(path, device="cuda:0", backend="pread", threads=args.threads)),
            "reference cuda, warm": warm(lambda: ref_pt.load_file(path, device="cuda:0")),
            "reference cuda, cold": cold(lambda: ref_pt.load_file(path, device="cuda:0")),
            "torch.load(mmap).to(cuda), warm": warm(
                lambda: {k: v.to("cuda:0") for k, v in torch.load(pt_path, mmap=True, weights_only=True).items()}
            ),
        }
        times: dict = {name: [] for name in cases}
        for rep in range(args.reps):
            for name in (cases if rep % 2 == 0 else reversed(list(cases))):
                times[name].append(cases[name]())
                torch.cuda.empty_cache()

        med = {name: statistics.median(v) for name, v in times.items()}
        print(f"\n{'case':<34}{'seconds':>9}{'GB/s':>8}")
        for name, t in med.items():
            print(f"{name:<34}{t:>9.3f}{size / t / 1e9:>8.2f}")
        raw_cold = med["raw parallel pread, cold"]
        print(f"\ntensafe pread cold vs raw cold read: {raw_cold / med['tensafe cuda (pread), cold']:.2f}x")
        print(f"tensafe warm (best backend) vs reference warm: "
              f"{med['reference cuda, warm'] / min(med['tensafe cuda (mmap), warm'], med['tensafe cuda (pread), warm']):.2f}x")


if __name__ == "__main__":
    main()
