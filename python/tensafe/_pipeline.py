"""Loading a file's data section onto an accelerator, in bounded chunks.

Two ways, both ending in one device allocation of which tensors are views:

- **staged** (any source): the data section is cut into chunks. Reader
  threads fill free slots of a ring of pinned staging buffers (positional
  reads or copies out of the mapping, without the GIL) while chunks already
  read are copied to the device asynchronously on two streams, so disk reads
  and host-to-device copies overlap. The staging memory is allocated once per
  load and bounded: `ring × chunk_bytes` bytes, never more; a slot is refilled
  only after the copy out of it has completed.
- **registered** (mapped files on CUDA): each chunk of the mapping is
  page-locked in place (`cudaHostRegister`, read-only) by reader threads and
  copied by DMA straight out of the page cache, then unlocked: no host copy
  at all. At most `ring` chunks are locked at a time. Drivers that refuse
  read-only registration get the staged path.

The staged scheduling does not depend on CUDA: with a CPU target the copies are
plain synchronous copies, which is how the tests check it on machines
without a GPU.
"""

from __future__ import annotations

import mmap
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Optional

import torch

from ._tensafe_rust import File

#: Defaults, chosen with `bench/gpu_bench.py --sweep` on an H100 host (see
#: docs/ARCHITECTURE.md): many mid-sized chunks keep enough reads in flight
#: to pull the page cache or an NVMe disk at full speed, and 16 MiB copies
#: already run at the full host-to-device rate. Pinned memory: 256 MiB.
CHUNK_BYTES = 16 << 20
RING = 16
MAX_THREADS = 16


#: `cudaHostRegisterReadOnly`: the GPU only reads the pages, so a read-only
#: (or copy-on-write) mapping can be locked without the kernel writing to it.
_REGISTER_READ_ONLY = 8


class StagingStats:
    """What a load used, for callers and tests: the path taken ("staged" or
    "registered"), peak pinned bytes, chunks copied and the most reads (or
    page locks) that were in flight at once."""

    def __init__(self) -> None:
        self.mode = ""
        self.pinned_bytes = 0
        self.chunks = 0
        self.max_in_flight = 0


def default_threads(ring: int) -> int:
    """Reader threads for a ring of `ring` slots: one per slot, at most one
    per core and at most MAX_THREADS."""
    return max(1, min(ring, os.cpu_count() or 1, MAX_THREADS))


def load_data_section(
    file: File,
    device: Any,
    *,
    chunk_bytes: int = CHUNK_BYTES,
    ring: int = RING,
    threads: Optional[int] = None,
    progress: Optional[Callable[[int, int], Any]] = None,
    stats: Optional[StagingStats] = None,
    mode: str = "auto",
) -> torch.Tensor:
    """The whole data section of `file` as a uint8 tensor on `device`.

    `mode`: "staged", "registered" (mapped files on CUDA; falls back to
    staged where the driver refuses) or "auto" (registered where possible).
    """
    if mode not in ("auto", "staged", "registered"):
        raise ValueError(f"unknown mode {mode!r}: expected 'auto', 'staged' or 'registered'")
    total = file.data_len
    target = torch.device(device)
    cuda = target.type == "cuda"
    out = torch.empty(total, dtype=torch.uint8, device=target)
    if total == 0:
        return out
    if cuda and mode != "staged" and file.backend == "mmap":
        if _copy_registered(file, out, chunk_bytes, ring, threads, progress, stats):
            if stats is not None:
                stats.mode = "registered"
            return out
    if stats is not None:
        stats.mode = "staged"
    chunk_bytes = max(1, min(chunk_bytes, total))
    chunks = [(start, min(chunk_bytes, total - start)) for start in range(0, total, chunk_bytes)]
    ring = max(1, min(ring, len(chunks)))
    staging: List[torch.Tensor] = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(ring)]
    if stats is not None:
        stats.pinned_bytes = sum(buf.numel() for buf in staging)
    streams = [torch.cuda.Stream(target) for _ in range(2)] if cuda else []
    copied: List[Any] = [None] * ring  # per slot: CUDA event recorded after the copy out of it

    def read(index: int) -> int:
        start, length = chunks[index]
        file.read_data_into(start, staging[index % ring][:length].numpy())
        return index

    with ThreadPoolExecutor(max_workers=threads or default_threads(ring)) as pool:
        pending = {}
        next_read = 0
        done_bytes = 0
        for index, (start, length) in enumerate(chunks):
            # Keep up to `ring` reads in flight; a slot is reused only after
            # the copy out of it has completed.
            while next_read < len(chunks) and next_read < index + ring:
                slot = next_read % ring
                if copied[slot] is not None:
                    copied[slot].synchronize()
                    copied[slot] = None
                pending[next_read] = pool.submit(read, next_read)
                next_read += 1
            if stats is not None:
                stats.max_in_flight = max(stats.max_in_flight, len(pending))
            pending.pop(index).result()
            slot = index % ring
            source = staging[slot][:length]
            if cuda:
                stream = streams[index % 2]
                with torch.cuda.stream(stream):
                    out[start : start + length].copy_(source, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(stream)
                copied[slot] = event
            else:
                out[start : start + length].copy_(source)
            done_bytes += length
            if stats is not None:
                stats.chunks += 1
            if progress is not None:
                progress(done_bytes, total)
    for stream in streams:
        torch.cuda.current_stream(target).wait_stream(stream)
    return out


def _copy_registered(
    file: File,
    out: torch.Tensor,
    chunk_bytes: int,
    ring: int,
    threads: Optional[int],
    progress: Optional[Callable[[int, int], Any]],
    stats: Optional[StagingStats],
) -> bool:
    """Copies a mapped file's data section into `out` by DMA from the mapping
    itself. Returns False, having copied nothing, when the driver will not
    lock the mapping's pages."""
    cudart = torch.cuda.cudart()
    with warnings.catch_warnings():
        # The mapping is read-only to torch: it is only ever copied from.
        warnings.simplefilter("ignore", UserWarning)
        source = torch.frombuffer(file.data_buffer(), dtype=torch.uint8)
    total = out.numel()
    base = source.data_ptr()
    # Lock whole pages: chunk boundaries sit on page boundaries of the mapping.
    first_page = base - base % mmap.PAGESIZE
    chunk_bytes = max(mmap.PAGESIZE, chunk_bytes - chunk_bytes % mmap.PAGESIZE)
    end = base + total
    chunks = []  # (page-aligned lock start, lock length, data start, data length)
    for lock_start in range(first_page, end, chunk_bytes):
        lock_end = min(lock_start + chunk_bytes, -(-end // mmap.PAGESIZE) * mmap.PAGESIZE)
        begin, stop = max(lock_start, base), min(lock_start + chunk_bytes, end)
        chunks.append((lock_start, lock_end - lock_start, begin - base, stop - begin))
    ring = max(1, min(ring, len(chunks)))
    streams = [torch.cuda.Stream(out.device) for _ in range(2)]
    locked: List[Any] = [None] * ring  # per slot: (lock start, event after its copy)

    def lock(index: int) -> int:
        start, length, _, _ = chunks[index]
        return int(cudart.cudaHostRegister(start, length, _REGISTER_READ_ONLY))

    def pending_unlock(index: int) -> List[int]:
        """Chunks before `index` whose pages are still locked."""
        return [i for i in range(max(0, index - ring), index) if locked[i % ring] is not None and locked[i % ring][0] == chunks[i][0]]

    def unlock(slot: int) -> None:
        start, event = locked[slot]
        event.synchronize()
        cudart.cudaHostUnregister(start)
        locked[slot] = None

    with ThreadPoolExecutor(max_workers=threads or default_threads(ring)) as pool:
        pending = {}
        next_lock = 0
        done_bytes = 0
        try:
            for index, (lock_start, lock_len, offset, length) in enumerate(chunks):
                while next_lock < len(chunks) and next_lock < index + ring:
                    if locked[next_lock % ring] is not None:
                        unlock(next_lock % ring)
                    pending[next_lock] = pool.submit(lock, next_lock)
                    next_lock += 1
                if stats is not None:
                    stats.max_in_flight = max(stats.max_in_flight, len(pending))
                    # Locked or being locked: the chunks from `index` on that
                    # were submitted, plus those locked and not yet unlocked.
                    in_use = sum(chunks[i][1] for i in pending) + sum(chunks[i][1] for i in pending_unlock(index))
                    stats.pinned_bytes = max(stats.pinned_bytes, in_use)
                if pending.pop(index).result() != 0:
                    if index == 0:
                        return False  # not supported here: nothing was copied
                    raise RuntimeError(f"cudaHostRegister failed for a chunk of {lock_len} bytes after earlier chunks succeeded")
                stream = streams[index % 2]
                with torch.cuda.stream(stream):
                    out[offset : offset + length].copy_(source[offset : offset + length], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(stream)
                locked[index % ring] = (lock_start, event)
                done_bytes += length
                if stats is not None:
                    stats.chunks += 1
                if progress is not None:
                    progress(done_bytes, total)
        finally:
            # Unlock whatever is still locked, including chunks locked after
            # a failure (their futures are waited for here).
            for index, future in pending.items():
                if future.result() == 0:
                    start, _, _, _ = chunks[index]
                    cudart.cudaHostUnregister(start)
            for slot in range(ring):
                if locked[slot] is not None:
                    unlock(slot)
    for stream in streams:
        torch.cuda.current_stream(out.device).wait_stream(stream)
    return True
