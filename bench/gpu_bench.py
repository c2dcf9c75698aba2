"""GPU loading benchmark: one command that builds, checks and measures.

    bash bench/gpu_bench.sh            # on a machine with CUDA, torch and safetensors==0.8.0

Writes a deterministic ≈4 GiB bf16 file, checks that tensafe's CUDA load is
bit-exact against the reference, then measures in one process, interleaved
(each repetition in a new random order, `--seed`), median of `--reps`:

- raw pinned host→device copy bandwidth (the PCIe/NVLink limit)
- raw parallel pread from the page cache (warm) and from disk (cold: evicted
  with posix_fadvise first, then `--settle` seconds of rest); warm rows read the file through the cache
  first (`fill_cache`), as a load of an uncached file reads past it
- tensafe `load_file(device="cuda:0")` warm and cold, mmap and pread backends
- reference `load_file(device="cuda:0")` warm and cold
- `torch.load(mmap=True)` then `.to("cuda:0")`, warm and cold

and prints GB/s with ratios. `--sweep` then (after that table, so that an
experiment's failure cannot take it down) times whole-file loads with other
staging settings than the defaults (schedule, chunk size and ring length:
how the defaults were chosen), the ceiling of host staging (native readers
with a pinned slot for every chunk), and the three schedules on the data
section alone over chunk sizes, ring lengths and reader threads, cold with
and without O_DIRECT.
Exits 2 when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(__file__))
from load_bench import raw_pread  # noqa: E402
from python_bench import cold_case, evict, model_like, run_interleaved  # noqa: E402

MiB = 1 << 20
#: The torch.load cases: their .pt file is written only when one runs.
TORCH_CASES = ("torch.load(mmap).to(cuda), warm", "torch.load(mmap).to(cuda), cold")


def pinned_pages(nbytes: int) -> torch.Tensor:
    """A pinned uint8 tensor of `nbytes` starting at a page boundary (as
    O_DIRECT reads need), by the staging slots' rule."""
    from tensafe._pipeline import _slot_start, _staging_slots

    slot = _staging_slots(1, nbytes, pinned=True, page_aligned=True)[0]
    return slot[_slot_start(slot, True) :][:nbytes]


def fill_cache(target: str, threads: int) -> None:
    """Reads `target` through the page cache (16 MiB pieces, `threads` at a
    time), so that it is cached: a load's own warm-up may not cache it, as
    loads of an uncached file read past the cache."""
    size = os.path.getsize(target)
    fd = os.open(target, os.O_RDONLY)
    try:
        def part(first: int) -> None:
            scratch = bytearray(16 * MiB)
            for at in range(first * 16 * MiB, size, threads * 16 * MiB):
                os.preadv(fd, [scratch], at)

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(part, range(threads)))
    finally:
        os.close(fd)


def sync() -> None:
    torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def medians(cases: dict, reps: int, seed: int) -> dict:
    """Median seconds per case, interleaved (each repetition in a new random
    order drawn from `seed`); nan for a case that failed. The medians so far
    are printed after each repetition, so that a run its time limit cuts
    short still shows what it measured."""

    def so_far(done: int, times: dict) -> None:
        line = ", ".join(f"{name} {statistics.median(t):.3f} s" for name, t in times.items() if t)
        print(f"(medians after {done} of {reps} repetitions: {line})", flush=True)

    times = run_interleaved(cases, reps, after_each=torch.cuda.empty_cache, keep_going=True, shuffle=seed, after_repetition=so_far)
    return {name: statistics.median(times[name]) if name in times else float("nan") for name in cases}


def print_table(med: dict, size: int, title: str) -> None:
    print(f"\n{title}\n{'case':<44}{'seconds':>9}{'GB/s':>8}")
    for name, t in med.items():
        print(f"{name:<44}{t:>9.3f}{size / t / 1e9:>8.2f}")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="readers for the raw pread baseline (default: as many as a load uses)")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--settle", type=float, default=0.5, help="seconds of rest after each eviction, before a cold case is timed")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random order of the cases in each repetition")
    ap.add_argument("--sweep", action="store_true", help="also time the staging pipeline's chunk/ring/thread settings")
    ap.add_argument("--match", default="", help="only the cases whose name matches this regular expression, searched "
                    "anywhere in the name (a short run; escape the names' parentheses and dots)")
    args = ap.parse_args()
    began = time.perf_counter()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        sys.exit(2)

    import safetensors.torch as ref_pt
    import tensafe.torch as ts_pt
    import tensafe._pipeline
    from tensafe._pipeline import CHUNK_BYTES, MAX_THREADS, RING, _plan_chunks, default_threads, load_data_section
    from tensafe._tensafe_rust import File, stage_data

    args.threads = args.threads or default_threads(MAX_THREADS)
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {os.cpu_count()} CPUs; "
          f"staging defaults: native schedule, {CHUNK_BYTES // MiB} MiB x {RING} slots, {default_threads(RING)} readers")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path, pt_path = os.path.join(tmp, "big.safetensors"), os.path.join(tmp, "big.pt")
        start = time.perf_counter()
        tensors = model_like(args.gib)
        ts_pt.save_file(tensors, path)
        if any(re.search(args.match, name) for name in TORCH_CASES):
            torch.save(tensors, pt_path)
        size = os.path.getsize(path)
        print(f"wrote {size / 2**30:.2f} GiB in {time.perf_counter() - start:.1f} s")
        evict(path)
        if not File(path, "pread").prefers_direct_reads():
            print("WARNING: the file still looks cached after eviction (a kernel such as gVisor that keeps or "
                  "misreports the page cache): the cold rows below are not cold")

        # Correctness first: bit-exact against the reference on the device.
        theirs = ref_pt.load_file(path, device="cuda:0")
        checks_failed = False
        for backend in ("mmap", "pread"):
            ours = ts_pt.load_file(path, device="cuda:0", backend=backend)
            wrong = [n for n in theirs if n not in ours or ours[n].device != theirs[n].device or not torch.equal(ours[n], theirs[n])]
            checks_failed |= bool(wrong) or list(ours) != list(theirs)
            verdict = ("is bit-exact against" if not wrong and list(ours) == list(theirs)
                       else f"DIFFERS ({len(wrong)} tensors) from" if wrong else "DIFFERS (key order) from")
            print(f"check: tensafe CUDA load ({backend}) {verdict} the reference ({size / 2**30:.2f} GiB)")
            del ours
        del theirs, tensors
        torch.cuda.empty_cache()

        # Whole 16 MiB pieces, for the sweep's slot-per-chunk rows.
        pinned = pinned_pages(-(-size // (16 * MiB)) * 16 * MiB)
        device_buf = torch.empty(size, dtype=torch.uint8, device="cuda:0")

        def cold(fn, target=path):
            return cold_case(fn, target, args.settle, timer=timed)

        def warm(fn, target=path):
            def run():
                fill_cache(target, args.threads)
                if target == path and File(path, "pread").prefers_direct_reads():
                    raise RuntimeError("the file is not cached after the warm-up: a warm row would read the disk")
                fn()
                return timed(fn)
            return run

        def with_settings(load, **settings):
            """`load` with other staging settings than the defaults."""
            # `load_file` looks `load_data_section` up in the module at each call.
            tensafe._pipeline.load_data_section = functools.partial(load_data_section, **settings)
            try:
                return load()
            finally:
                tensafe._pipeline.load_data_section = load_data_section

        def torch_mmap():
            return {k: v.to("cuda:0") for k, v in torch.load(pt_path, mmap=True, weights_only=True).items()}

        cases = {
            "raw pinned H2D copy": lambda: timed(lambda: device_buf.copy_(pinned[:size], non_blocking=True)),
            # Into one pinned buffer, faulted in beforehand (the ring reuses its
            # pinned slots): what the disk and the page cache give, no more.
            "raw parallel pread, warm": warm(lambda: raw_pread(path, args.threads, into=pinned.numpy())),
            "raw parallel pread, cold": cold(lambda: raw_pread(path, args.threads, into=pinned.numpy())),
            "raw parallel O_DIRECT, cold": cold(lambda: raw_pread(path, args.threads, direct=True, into=pinned.numpy())),
            "tensafe cuda (mmap), warm": warm(lambda: ts_pt.load_file(path, device="cuda:0")),
            "tensafe cuda (mmap), cold": cold(lambda: ts_pt.load_file(path, device="cuda:0")),
            "tensafe cuda (pread), warm": warm(lambda: ts_pt.load_file(path, device="cuda:0", backend="pread")),
            "tensafe cuda (pread), cold": cold(lambda: ts_pt.load_file(path, device="cuda:0", backend="pread")),
            "reference cuda, warm": warm(lambda: ref_pt.load_file(path, device="cuda:0")),
            "reference cuda, cold": cold(lambda: ref_pt.load_file(path, device="cuda:0")),
            TORCH_CASES[0]: warm(torch_mmap, pt_path),
            TORCH_CASES[1]: cold(torch_mmap, pt_path),
        }
        cases = {name: case for name, case in cases.items() if re.search(args.match, name)}
        med = medians(cases, args.reps, args.seed)
        print_table(med, size, f"whole-file loads to cuda:0, median of {args.reps}")
        def best(*names: str) -> float:  # nan where --match left the cases out
            times = [med[n] for n in names if n in med and med[n] == med[n]]
            return min(times) if times else float("nan")

        best_warm = best("tensafe cuda (mmap), warm", "tensafe cuda (pread), warm")
        best_cold = best("tensafe cuda (mmap), cold", "tensafe cuda (pread), cold")
        print(f"\ntensafe warm, best backend: {size / best_warm / 1e9:.1f} GB/s (target >= 40)")
        raw_cold = best("raw parallel pread, cold", "raw parallel O_DIRECT, cold")
        print(f"tensafe cold, best backend vs best raw cold read: {raw_cold / best_cold:.2f}x (target >= 0.95)")
        print(f"tensafe vs reference: warm {best('reference cuda, warm') / best_warm:.2f}x, cold {best('reference cuda, cold') / best_cold:.2f}x faster")
        print(f"tensafe vs torch.load(mmap): warm {best(TORCH_CASES[0]) / best_warm:.2f}x, "
              f"cold {best(TORCH_CASES[1]) / best_cold:.2f}x faster")
        print(f"(file written, checked and the table above measured in {time.perf_counter() - began:.0f} s)")
        sys.stdout.flush()

        # After the acceptance table: a sticky CUDA error in an experiment
        # cannot take it down.
        if args.sweep:
            # Printed group by group, so that a run cut short keeps what it measured.
            sweep, swept = {}, {}

            def measure_group(title: str, reps: int = args.reps) -> None:
                group = {name: case for name, case in sweep.items() if re.search(args.match, name) and name not in swept}
                if group:
                    swept.update(medians(group, reps, args.seed))
                    print_table({name: swept[name] for name in group}, size, f"staging sweep: {title}, median of {reps}")

            # Most telling first: whole `load_file` calls with the default
            # and the other settings (what picks the defaults), then the
            # ceiling of host staging, then the data-section sweeps.
            for schedule, chunk_mib, ring in (("native", 2, 128), ("native", 4, 64), ("native", 8, 32), ("native", 16, 16), ("ring", 16, 16)):
                def load(schedule=schedule, chunk=chunk_mib * MiB, ring=ring):
                    return with_settings(lambda: ts_pt.load_file(path, device="cuda:0"), schedule=schedule, chunk_bytes=chunk, ring=ring)
                label = f"whole file: {schedule} {chunk_mib:>2} MiB x {ring:>2}"
                sweep[label + ", warm"] = warm(load)
                if schedule == "native" and chunk_mib in (4, 8):
                    sweep[label + ", cold"] = cold(load)
            measure_group("whole files, default backend and readers", reps=max(args.reps, 5))
            # The ceiling of host staging: native readers with a slot for
            # every chunk (one pinned buffer the size of the data, allocated
            # once), so no read waits for a copy.
            file = File(path, "pread")
            for chunk_mib in (8, 16):
                chunks = _plan_chunks(file.data_start, file.data_len, chunk_mib * MiB, False)
                slots = [pinned[i * chunk_mib * MiB :][: chunk_mib * MiB].numpy() for i in range(len(chunks))]
                def unbounded(chunks=chunks, slots=slots):
                    target = (0, device_buf.data_ptr(), file.data_len, torch.cuda.current_stream().cuda_stream)
                    stage_data(file, chunks, slots, 16, target, direct=False)
                sweep[f"native {chunk_mib:>2} MiB, a slot per chunk, 16 readers, warm"] = warm(unbounded)
            measure_group("the ceiling of host staging (data section only)")
            # Each reader issues its own copies (no central scheduler), from
            # Python threads or from Rust threads (native, the default).
            for schedule in ("readers", "native"):
                for chunk_mib, ring in ((16, 16), (16, 32), (8, 32), (32, 32), (4, 64)):
                    def readers(chunk=chunk_mib * MiB, ring=ring, direct=False, schedule=schedule):
                        return load_data_section(File(path, "pread"), "cuda:0", chunk_bytes=chunk, ring=ring, threads=16, direct=direct, schedule=schedule)
                    label = f"{schedule} {chunk_mib:>2} MiB x {ring:>2}, 16 readers"
                    sweep[label + ", warm"] = warm(readers)
                    if (chunk_mib, ring) == (16, 32):
                        sweep[label + ", cold, O_DIRECT"] = cold(lambda readers=readers: readers(direct=True))
                measure_group(f"{schedule} schedule (data section only)")
            settings = {
                "pread": [(64, 4, 4), (32, 8, 8), (16, 16, 16), (8, 32, 16), (32, 16, 16), (4, 64, 16)],
                "mmap": [(16, 16, 16)],
            }
            for backend, configs in settings.items():
                for chunk_mib, ring, threads in configs:
                    def by_ring(backend=backend, chunk=chunk_mib * MiB, ring=ring, threads=threads, direct=False):
                        return load_data_section(File(path, backend), "cuda:0", chunk_bytes=chunk, ring=ring, threads=threads, direct=direct, schedule="ring")
                    label = f"{backend} {chunk_mib:>2} MiB x {ring:>2}, {threads:>2} readers"
                    sweep[label + ", warm"] = warm(by_ring)
                    if (chunk_mib, ring) in ((16, 16), (8, 32)):
                        sweep[label + ", cold"] = cold(by_ring)
                        sweep[label + ", cold, O_DIRECT"] = cold(lambda by_ring=by_ring: by_ring(direct=True))
            measure_group("ring schedule, chunk x slots, readers (data section only)")
        if checks_failed:
            sys.exit(1)


if __name__ == "__main__":
    main()
