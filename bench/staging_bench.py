"""The staging schedules side by side with a CPU target: what each costs per
chunk, on any machine (no GPU needed).

    .venv/bin/python bench/staging_bench.py [--gib 0.5] [--reps 7] [--ring 8] [--threads 2] [--chunks-kib 1024,256]

`load_data_section(file, "cpu", ...)` of a warm file, for every schedule
("ring", "readers", "native") and chunk size, interleaved, median of
`--reps`. With a CPU target the copies are plain memory copies, so this is
not a GPU figure: it shows the scheduling overhead per chunk, which grows
as chunks shrink (the GIL for the Python schedules). The GPU figures come
from `bench/gpu_bench.py --sweep`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from python_bench import model_like, run_interleaved, timed  # noqa: E402

import tensafe.torch as ts_pt  # noqa: E402
from tensafe._pipeline import load_data_section  # noqa: E402
from tensafe._tensafe_rust import File  # noqa: E402

SCHEDULES = ("ring", "readers", "native")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--ring", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks-kib", default="1024,256", help="comma-separated chunk sizes")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "staging.safetensors")
        ts_pt.save_file(model_like(args.gib), path)
        size = File(path, "pread").data_len
        cases = {}
        for kib in (int(k) for k in args.chunks_kib.split(",")):
            for schedule in SCHEDULES:
                def load(chunk=kib << 10, schedule=schedule):
                    return load_data_section(File(path, "pread"), "cpu", chunk_bytes=chunk, ring=args.ring,
                                             threads=args.threads, direct=False, schedule=schedule)
                cases[f"{schedule:<8} {kib:>5} KiB x {args.ring}"] = lambda load=load: timed(load)
        times = run_interleaved(cases, args.reps)
        print(f"data section {size / 2**30:.2f} GiB, warm, {args.threads} readers, median of {args.reps}")
        print(f"{'case':<28}{'seconds':>9}{'GB/s':>8}")
        for name, runs in times.items():
            median = statistics.median(runs)
            print(f"{name:<28}{median:>9.3f}{size / median / 1e9:>8.2f}")


if __name__ == "__main__":
    main()
