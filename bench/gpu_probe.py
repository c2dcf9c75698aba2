"""Where a warm CUDA load's time goes: measurements behind the staging design.

    python bench/gpu_probe.py staging  FILE   # parallel reads into each kind of staging memory
    python bench/gpu_probe.py register FILE   # cudaHostRegister of the page cache, and DMA from it
    python bench/gpu_probe.py profile  FILE   # one warm load_file(device="cuda:0"), by phase

FILE is a safetensors file (e.g. `model_like` of `bench/python_bench.py`,
saved). Each mode prints one line per measurement as it goes, so a mode
stopped by `timeout` still reports what it finished; run `register` under
`timeout`, as a driver that mishandles locked file pages could hang it.
What these showed on the H100 host is in docs/ARCHITECTURE.md ("Warm CUDA
loads").
"""

from __future__ import annotations

import mmap
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from gpu_bench import fill_cache, pinned_pages  # noqa: E402
from python_bench import evict, run_interleaved  # noqa: E402

MiB = 1 << 20
PAGE = mmap.PAGESIZE
#: cudaHostRegister flags.
REGISTER_DEFAULT, REGISTER_READ_ONLY = 0, 8
#: Linux's MADV_POPULATE_READ (Python's mmap module may not name it).
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def say(*parts) -> None:
    print(*parts, flush=True)


def gbps(size: int, seconds: float) -> str:
    return f"{seconds:8.3f} s {size / seconds / 1e9:7.2f} GB/s"


def anon(size: int, huge: bool) -> mmap.mmap:
    """A touched anonymous mapping, with or without transparent huge pages."""
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # Python's default is shared (shmem)
    m.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
    np.frombuffer(m, dtype=np.uint8)[::PAGE] = 1
    return m


def address(buf) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


def huge_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return -1


def parallel_read(fd: int, size: int, slots: list, threads: int) -> None:
    """Reads [0, size) in slot-sized chunks; thread i reads chunks i, i+threads, …
    into slot i (the ring schedule's access pattern, without the device
    copy; this probe predates the native schedule)."""
    chunk = len(slots[0])

    def worker(i: int) -> None:
        view = slots[i]
        for offset in range(i * chunk, size, threads * chunk):
            want = min(chunk, size - offset)
            got = os.preadv(fd, [view[:want]], offset)
            if got != want:
                raise OSError(f"short read at {offset}: {got} of {want}")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))


def staging(path: str, reps: int = 3, threads: int = 16, chunk: int = 16 * MiB) -> None:
    size = os.path.getsize(path) // PAGE * PAGE
    say(f"staging: {size / 2**30:.2f} GiB, {threads} readers x {chunk // MiB} MiB; THP: "
        + open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip())
    cudart = torch.cuda.cudart()
    pinned = [pinned_pages(chunk) for _ in range(threads)]
    small = anon(threads * chunk, huge=False)
    before = huge_kib()
    huge = anon(threads * chunk, huge=True)
    say(f"  THP arena: {huge_kib() - before} KiB of {threads * chunk // 1024} KiB in huge pages")
    huge_reg = anon(threads * chunk, huge=True)
    start = time.perf_counter()
    rc = int(cudart.cudaHostRegister(address(huge_reg), len(huge_reg), REGISTER_DEFAULT))
    say(f"  cudaHostRegister of the {threads * chunk // MiB} MiB THP arena: rc {rc}, {time.perf_counter() - start:.4f} s")

    def slices(m):
        view = memoryview(m)
        return [view[i * chunk : (i + 1) * chunk] for i in range(threads)]

    kinds = {"torch pinned (cudaHostAlloc)": [t.numpy().data.cast("B") for t in pinned],
             "anonymous 4 KiB pages": slices(small), "anonymous THP": slices(huge)}
    if rc == 0:
        kinds["anonymous THP, registered"] = slices(huge_reg)
    # Warm: every kind of memory. Cold (seconds each): the two candidates for
    # the ring, buffered and O_DIRECT interleaved in one run.
    warm_cases = [(name, "warm") for name in kinds]
    cold_cases = [(name, mode) for name in kinds if name.startswith("torch") or name.endswith("registered")
                  for mode in ("cold", "cold, O_DIRECT")]

    def case(name, mode):
        def run() -> float:
            if mode == "warm":
                fill_cache(path, threads)
            else:
                evict(path)
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if mode.endswith("O_DIRECT") else 0))
            try:
                start = time.perf_counter()
                parallel_read(fd, size, kinds[name], threads)
                return time.perf_counter() - start
            finally:
                os.close(fd)
        return run

    for cases in (warm_cases, cold_cases):
        times = run_interleaved({key: case(*key) for key in cases}, reps)
        for (name, mode), t in times.items():
            say(f"  read into {name:<32} {mode:<15} {gbps(size, statistics.median(t))}  (min {min(t):.3f}, max {max(t):.3f})")
    if rc == 0:
        cudart.cudaHostUnregister(address(huge_reg))


def clear_last_cuda_error() -> None:
    """cudaGetLastError in the runtime library already loaded (torch binds none)."""
    import ctypes

    with open("/proc/self/maps") as maps:
        for path in {line.split()[-1] for line in maps if "libcudart.so" in line}:
            ctypes.CDLL(path).cudaGetLastError()


def register(path: str) -> None:
    size = os.path.getsize(path)
    cudart = torch.cuda.cudart()
    try:
        from cuda.bindings import runtime as rt

        attr = rt.cudaDeviceAttr.cudaDevAttrHostRegisterReadOnlySupported
        say(f"register: HostRegisterReadOnlySupported = {rt.cudaDeviceGetAttribute(attr, 0)}")
    except Exception as e:  # informative only
        say(f"register: read-only support unknown ({type(e).__name__}: {e})")
    fill_cache(path, 16)
    expected = torch.from_numpy(np.fromfile(path, dtype=np.uint8)).cuda()
    fd = os.open(path, os.O_RDONLY)
    device = torch.empty(size, dtype=torch.uint8, device="cuda:0")

    def fresh() -> mmap.mmap:
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)

    def dma(m: mmap.mmap) -> float:
        source = torch.frombuffer(m, dtype=torch.uint8)
        torch.cuda.synchronize()
        start = time.perf_counter()
        device.copy_(source, non_blocking=True)
        torch.cuda.synchronize()
        took = time.perf_counter() - start
        del source
        return took

    # A writable registration of a read-only mapping is refused; the runtime
    # keeps the error for torch's next call unless it is read back.
    m = fresh()
    rc = int(cudart.cudaHostRegister(address(m), size, REGISTER_DEFAULT))
    say(f"  whole file, writable registration: rc {rc}")
    if rc:
        clear_last_cuda_error()
    else:
        cudart.cudaHostUnregister(address(m))
    m.close()
    for flags in (REGISTER_READ_ONLY,):
        for populate in (False, True):
            m = fresh()
            base = address(m)
            populate_s = 0.0
            if populate:
                start = time.perf_counter()
                m.madvise(MADV_POPULATE_READ)
                populate_s = time.perf_counter() - start
            start = time.perf_counter()
            rc = int(cudart.cudaHostRegister(base, size, flags))
            took = time.perf_counter() - start
            line = f"  whole file, flags {flags}, populated first {populate} ({populate_s:.3f} s): register rc {rc} in {took:.3f} s"
            if rc == 0:
                pinned_dma = dma(m)
                device_ok = torch.equal(device, expected)
                start = time.perf_counter()
                cudart.cudaHostUnregister(base)
                line += f"; DMA {gbps(size, pinned_dma)}, exact {device_ok}; unregister {time.perf_counter() - start:.3f} s"
            say(line)
            m.close()
            device.zero_()

    for chunk_mib in (16, 64, 256):
        for workers in (1, 8, 16):
            chunk = chunk_mib * MiB
            m = fresh()
            base = address(m)
            spans = [(o, min(chunk, size - o)) for o in range(0, size, chunk)]
            spans = [(o, -(-n // PAGE) * PAGE) for o, n in spans]
            failures, locked = [], []
            lock = threading.Lock()

            def one(span):
                rc = int(cudart.cudaHostRegister(base + span[0], span[1], REGISTER_READ_ONLY))
                with lock:
                    (failures if rc else locked).append(rc if rc else span[0])

            start = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(one, spans))
            took = time.perf_counter() - start
            if failures:
                clear_last_cuda_error()
            start = time.perf_counter()
            for o in locked:  # every lock taken, so that later rows start clean
                cudart.cudaHostUnregister(base + o)
            say(f"  {chunk_mib:>3} MiB chunks, {workers:>2} threads: register {gbps(size, took)}, "
                f"failures {len(failures)}{' ' + str(failures[:3]) if failures else ''}, unregister {time.perf_counter() - start:.3f} s")
            m.close()
    os.close(fd)


def profile(path: str) -> None:
    import cProfile
    import pstats

    import tensafe.torch as ts_pt
    from tensafe._pipeline import load_data_section
    from tensafe._tensafe_rust import File

    ts_pt.load_file(path, device="cuda:0")
    size = os.path.getsize(path)
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        file = File(path, "mmap")
        t1 = time.perf_counter()
        data = load_data_section(file, "cuda:0")
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        del data
        torch.cuda.empty_cache()
        t3 = time.perf_counter()
        tensors = ts_pt.load_file(path, device="cuda:0")
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        say(f"profile: open {t1 - t0:.4f} s; data section {gbps(size, t2 - t1)}; whole load_file {gbps(size, t4 - t3)} "
            f"({len(tensors)} tensors)")
        del tensors
        torch.cuda.empty_cache()
    profiler = cProfile.Profile()
    profiler.enable()
    ts_pt.load_file(path, device="cuda:0")
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(18)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("staging", "register", "profile"):
        sys.exit(__doc__)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    {"staging": staging, "register": register, "profile": profile}[sys.argv[1]](sys.argv[2])
