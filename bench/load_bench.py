"""Loading at the hardware limit: tensafe against the raw read speed, the
reference `safetensors` and `torch.load(mmap=True)`, interleaved in one run
(each repetition in a new random order, `--seed`).

    .venv/bin/python bench/load_bench.py [--gib 1.0] [--small 50000] [--reps 5] [--threads 4] [--dir DIR]

Cases (cold = file evicted from the page cache with posix_fadvise(DONTNEED)
right before, then `--settle` seconds of rest; every load is followed by a
touch of every page of every tensor):

- raw parallel pread, cold / warm: `--threads` threads reading 8 MiB blocks
  into one buffer; raw parallel O_DIRECT, cold: the same past the page cache
  (the faster cold one is the limit a loader can reach)
- tensafe engine, cached / O_DIRECT, cold: the I/O engine alone, forced
  through the page cache or past it (what `DirectIo::Auto` chooses between)
- tensafe load_file (mmap, default), cold
- reference load_file (mmap, default), cold
- torch.load(mmap=True, weights_only=True), cold (a file torch.save wrote here)
- tensafe load_file(backend="pread"), cold: private memory, parallel reads
- reference load_file(backend="pread"), cold
- rank part, rows / columns: rank 0 of 2's part of every matrix (split
  along dim 0 or 1, the norms whole), cold: tensafe `load_tensor_parallel`
  against the reference's `get_slice` with the same bounds (lazy views: the
  touch reads them)
- every tensor as `get_slice(name)[...]` (how transformers loads weights),
  cold: tensafe against the reference, both lazy views of the mapping
- small tensors: open + get_tensors of a file of `--small` tiny tensors, warm

Prints medians, with the fastest and slowest repetition, in seconds and
GB/s, and ratios; numbers, not pass/fail. On the 2-core development VM cold
timings of one case swing by up to 3x between repetitions (fresh memory
faults on the host too, see docs/ARCHITECTURE.md, "crates/tensafe-io"):
read the spread, and the per-repetition ratios, before a median.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import torch

import safetensors
import safetensors.torch as ref_pt
import tensafe
import tensafe.torch as ts_pt

sys.path.insert(0, os.path.dirname(__file__))
from python_bench import cold_case, model_like, run_interleaved, small_tensors, touch_all  # noqa: E402


def raw_pread(path: str, threads: int, block: int = 8 << 20, direct: bool = False, into: Any = None) -> None:
    """Reads the whole file with `threads` parallel positional reads of
    `block` bytes into one fresh allocation, or into `into` (a writable,
    page-aligned buffer of the file's size rounded up to pages); `direct`
    bypasses the page cache (O_DIRECT, page-aligned buffer and reads)."""
    size = os.path.getsize(path)
    # Like a loader's fresh allocation: not zero-filled up front (bytearray
    # would be); an anonymous mapping is page-aligned, as O_DIRECT needs.
    # Private: Python's default, a shared one, is shmem and faults slower.
    buf = mmap.mmap(-1, -(-size // 4096) * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) if into is None else None
    view = memoryview(buf if into is None else into).cast("B")
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    next_offset = [0]
    lock = threading.Lock()
    errors = []

    def worker():
        try:
            while True:
                with lock:
                    offset = next_offset[0]
                    next_offset[0] += block
                if offset >= size:
                    return
                end = min(size, offset + block)
                # Direct reads ask for whole pages (the last one stops at the
                # end of the file).
                stop = min(len(view), offset + block) if direct else end
                while offset < end:  # os.preadv releases the GIL
                    got = os.preadv(fd, [view[offset:stop]], offset)
                    if got == 0:
                        raise OSError(f"unexpected end of file at {offset}")
                    offset += got
        except Exception as e:  # reported by the caller, not lost with the thread
            errors.append(e)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    os.close(fd)
    view.release()
    if buf is not None:
        buf.close()
    if errors:
        raise errors[0]


def engine_read(path: str, threads: int, direct: bool) -> None:
    """tensafe's I/O engine alone: the data section into a fresh buffer aligned
    like the file, through the page cache or past it."""
    from tensafe._tensafe_rust import DIRECT_ALIGN, File, HostBuffer

    f = File(path, "pread")
    shift = f.data_start % DIRECT_ALIGN
    buffer = HostBuffer(shift + f.data_len)
    f.read_all_into(memoryview(buffer)[shift : shift + f.data_len], threads=threads, direct=direct)


#: Rank 0 of 2's part: every matrix split along a dim, the norms' vectors whole.
def tp_rules(dim: int) -> list:
    return [("*norm*", None), ("*", dim)]


def whole_slices(lib: Any, path: str) -> dict:
    """Every tensor as transformers loads it: `get_slice(name)[...]`."""
    with lib.safe_open(path, "pt") as f:
        return {name: f.get_slice(name)[...] for name in f.keys()}


def reference_rank_part(path: str, dim: int) -> dict:
    """What `load_tensor_parallel` returns, through the reference: each
    tensor's `get_slice` indexed with the same bounds (lazy views)."""
    from tensafe._tensafe_rust import TensorParallelPlan
    from tensafe.torch import _part_index

    plan = TensorParallelPlan(0, 2, tp_rules(dim))
    out = {}
    with safetensors.safe_open(path, "pt") as f:
        for name in f.keys():
            part = f.get_slice(name)
            out[name] = part[_part_index(plan.split(name, part.get_shape()))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--small", type=int, default=50000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--settle", type=float, default=0.5, help="seconds of rest after each eviction, before a cold case is timed")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random order of the cases in each repetition")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path, small, pt_path = (os.path.join(tmp, n) for n in ("big.safetensors", "small.safetensors", "big.pt"))
        tensors = model_like(args.gib)
        ref_pt.save_file(tensors, path)
        torch.save(tensors, pt_path)
        ref_pt.save_file(small_tensors(args.small), small)
        del tensors
        size = os.path.getsize(path)
        print(f"{size / 2**30:.2f} GiB bf16 file; {args.small} small tensors; {args.threads} threads; "
              f"median of {args.reps}; cold = evicted from the page cache")

        def cold(fn, target=path):
            return cold_case(fn, target, args.settle)

        def warm(fn):
            def run():
                fn()  # fill the cache
                start = time.perf_counter()
                fn()
                return time.perf_counter() - start
            return run

        cases = {
            "raw parallel pread, cold": cold(lambda: raw_pread(path, args.threads)),
            "raw parallel pread, warm": warm(lambda: raw_pread(path, args.threads)),
            "raw parallel O_DIRECT, cold": cold(lambda: raw_pread(path, args.threads, direct=True)),
            "tensafe engine, cached, cold": cold(lambda: engine_read(path, args.threads, direct=False)),
            "tensafe engine, O_DIRECT, cold": cold(lambda: engine_read(path, args.threads, direct=True)),
            "tensafe load_file + touch": cold(lambda: touch_all(ts_pt.load_file(path))),
            "reference load_file + touch": cold(lambda: touch_all(ref_pt.load_file(path))),
            "torch.load(mmap) + touch": cold(lambda: touch_all(torch.load(pt_path, mmap=True, weights_only=True)), pt_path),
            "tensafe pread (private)": cold(lambda: touch_all(ts_pt.load_file(path, backend="pread", threads=args.threads))),
            "reference pread (private)": cold(lambda: touch_all(ref_pt.load_file(path, backend="pread"))),
            "tensafe rank part, rows": cold(lambda: touch_all(ts_pt.load_tensor_parallel(path, 0, 2, tp_rules(0)).tensors)),
            "reference rank part, rows": cold(lambda: touch_all(reference_rank_part(path, 0))),
            "tensafe rank part, columns": cold(lambda: touch_all(ts_pt.load_tensor_parallel(path, 0, 2, tp_rules(1)).tensors)),
            "reference rank part, columns": cold(lambda: touch_all(reference_rank_part(path, 1))),
            "tensafe get_slice[...] + touch": cold(lambda: touch_all(whole_slices(tensafe, path))),
            "reference get_slice[...] + touch": cold(lambda: touch_all(whole_slices(safetensors, path))),
            f"tensafe {args.small} small": warm(lambda: ts_pt.load_file(small)),
            f"reference {args.small} small": warm(lambda: ref_pt.load_file(small)),
        }
        times = run_interleaved(cases, args.reps, shuffle=args.seed)

        med = {name: statistics.median(v) for name, v in times.items()}
        # The raw limit is the faster of the two raw cold reads.
        raw = min(med["raw parallel pread, cold"], med["raw parallel O_DIRECT, cold"])
        print(f"\n{'case':<32}{'seconds':>9}{'min':>7}{'max':>7}{'GB/s':>8}{'vs best raw cold':>18}")
        for name, t in med.items():
            if "small" in name or "rank part" in name:
                continue
            print(f"{name:<32}{t:>9.3f}{min(times[name]):>7.2f}{max(times[name]):>7.2f}{size / t / 1e9:>8.2f}{raw / t:>17.2f}x")
        for name in (n for n in med if "rank part" in n):  # half the bytes (rows) or all of them (columns): no GB/s
            print(f"{name:<32}{med[name]:>9.3f}{min(times[name]):>7.2f}{max(times[name]):>7.2f}")
        print()

        def compare(label: str, ours: str, theirs: str) -> None:
            # Cold timings on a VM drift with the host's state; the ratio of
            # the two runs within each repetition cancels part of that drift.
            paired = statistics.median(t / o for o, t in zip(times[ours], times[theirs]))
            print(f"tensafe/reference, {label}: {med[theirs] / med[ours]:.2f}x faster "
                  f"(median of per-repetition ratios {paired:.2f}x)")

        compare("default mmap load + touch", "tensafe load_file + touch", "reference load_file + touch")
        compare("pread private load       ", "tensafe pread (private)", "reference pread (private)")
        compare("rank 0 of 2, row parts   ", "tensafe rank part, rows", "reference rank part, rows")
        compare("rank 0 of 2, column parts", "tensafe rank part, columns", "reference rank part, columns")
        compare("get_slice(name)[...] + touch", "tensafe get_slice[...] + touch", "reference get_slice[...] + touch")
        ts_small, ref_small = med[f"tensafe {args.small} small"], med[f"reference {args.small} small"]
        print(f"{args.small} small tensors, open + get all:     tensafe {ts_small * 1e3:.1f} ms "
              f"({ts_small / args.small * 1e6:.1f} us/tensor), reference {ref_small * 1e3:.1f} ms "
              f"({ref_small / args.small * 1e6:.1f} us/tensor): {ref_small / ts_small:.2f}x faster")


if __name__ == "__main__":
    main()
