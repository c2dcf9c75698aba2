"""Loading a file's data section onto an accelerator through pinned staging
buffers.

The data section is cut into chunks, read into a bounded set of pinned
slots and copied to one device allocation; tensors are views of it. The
staging memory is allocated once per load and bounded: `ring × chunk_bytes`
bytes asked for, never more (with direct reads, chunks are whole pages, at
least one, and a slot gets a page more only where an allocator hands out
memory that is not page-aligned; torch's pinned allocator rounds each slot
up to a power of two, which the default chunk size already is); a slot is
refilled only after the copy out of it has completed.

Three schedules run that plan (`load_data_section(schedule=...)`):

- "native", the default for CUDA: Rust reader threads that never take the
  GIL (`stage_data` → `tensafe_io::staging`). Each takes the next chunk,
  reads it into one of its own slots and issues the copy through the CUDA
  driver API (`tensafe-cuda`) on its own stream, so no reader waits for
  another. It was the fastest on an H100 host (docs/ARCHITECTURE.md,
  "Staging defaults"). It returns once every copy has completed; progress
  is reported every `PROGRESS_STEP` bytes and once at that end.
- "ring": one Python thread issues every copy in file order on two streams
  while a pool of readers fills the slots; progress every `PROGRESS_STEP`
  bytes and at the end. The
  default where torch's "cuda" is not NVIDIA's driver (ROCm builds), since
  the native schedule talks to libcuda itself, and where the native
  schedule could not start (`NativeStagingUnavailable`: a libcuda that is
  missing, a stub, or not the driver torch uses): the first such load warns
  and goes on through the ring, and later loads take the ring at once.
- "readers": the native schedule's rule in Python threads (each copy takes
  the GIL); kept for comparison.

With `direct`, a local file is read past the page cache (`O_DIRECT`): the
disk writes straight into the pinned slots, and the host is not left holding
a second copy of the model in its cache. Direct reads need the same offset
within a page in the file and in memory, so chunks are then cut at page
boundaries of the file (`_plan_chunks`). By default the choice is the CPU
loads' (`File.prefers_direct_reads`): direct when little of the file is
cached, through the cache when it is (measured on H100 hosts: the figures
are in docs/ARCHITECTURE.md).

The scheduling does not depend on CUDA: with a CPU target the copies are
plain memory copies, which is how the tests check it on machines without a
GPU.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Optional, Tuple

import torch

from ._tensafe_rust import DIRECT_ALIGN, PROGRESS_STEP, File, NativeStagingUnavailable, cut_reads, stage_data

#: Chunk bytes and slots by schedule, chosen with `bench/gpu_bench.py
#: --sweep` on H100 hosts (the tables are in docs/ARCHITECTURE.md): the
#: native schedule is fastest with small chunks, which cost it little and
#: keep every reader busy; the Python schedules pay for each chunk, and are
#: fastest with 16 MiB ones. Pinned memory: 256 MiB either way.
DEFAULTS = {"native": (4 << 20, 64), "ring": (16 << 20, 16), "readers": (16 << 20, 16)}
#: The default schedule's settings.
CHUNK_BYTES, RING = DEFAULTS["native"]
MAX_THREADS = 16


#: Why the native schedule could not start in this process, once it could
#: not: loads that did not ask for a schedule then take the ring.
_native_refused: Optional[str] = None


def _refuse_native(why: str) -> None:
    """Remembers that the native schedule cannot start here, and says so once."""
    global _native_refused
    if _native_refused is None:
        warnings.warn(f"tensafe: loading through torch's copies instead of the native schedule: {why}", RuntimeWarning, stacklevel=2)
    _native_refused = why


class StagingStats:
    """What a load used, for callers and tests: pinned bytes, chunks copied,
    the most reads that were in flight at once, whether it was set up for
    direct reads, and how many bytes it actually read past the page cache
    (none for files in memory or remote, or where the filesystem has no
    `O_DIRECT`)."""

    def __init__(self) -> None:
        self.pinned_bytes = 0
        self.chunks = 0
        self.max_in_flight = 0
        self.direct = False
        self.direct_bytes = 0


def default_threads(ring: int) -> int:
    """Reader threads for a ring of `ring` slots: one per slot, at most one
    per core this process may run on, and at most MAX_THREADS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(ring, cores or 1, MAX_THREADS))


def _plan_chunks(data_start: int, total: int, chunk_bytes: int, direct: bool) -> List[Tuple[int, int, int]]:
    """The data section cut into chunks: (offset in the data section, length,
    offset in the staging slot), by the I/O engine's rule (`cut_reads`).

    For direct reads the cuts sit at page-rounded multiples of `chunk_bytes`
    in the file, and each chunk keeps its file offset's place within a page
    in its slot: every chunk is then page-aligned in the file and in the
    slot but for the file's first and last page, and no chunk needs more
    than that rounded size of slot. Otherwise chunks are plain
    `chunk_bytes` pieces at the slot's start."""
    pieces = cut_reads(data_start, total, max(1, chunk_bytes), direct)
    return [(at - data_start, length, at % DIRECT_ALIGN if direct else 0) for at, length in pieces]


def _staging_slots(ring: int, slot_bytes: int, *, pinned: bool, page_aligned: bool) -> List[torch.Tensor]:
    """`ring` staging buffers of `slot_bytes`. Pinned memory comes page-aligned
    (and torch rounds pinned sizes up to a power of two, so exact sizes
    matter); where an allocator gives a buffer that is not and alignment is
    needed, it gets one page more to shift the data by."""
    slots = []
    for _ in range(ring):
        slot = torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=pinned)
        if page_aligned and slot.data_ptr() % DIRECT_ALIGN:
            slot = torch.empty(slot_bytes + DIRECT_ALIGN, dtype=torch.uint8, pin_memory=pinned)
        slots.append(slot)
    return slots


def load_data_section(
    file: File,
    device: Any,
    *,
    chunk_bytes: Optional[int] = None,
    ring: Optional[int] = None,
    threads: Optional[int] = None,
    progress: Optional[Callable[[int, int], Any]] = None,
    stats: Optional[StagingStats] = None,
    direct: Optional[bool] = None,
    schedule: Optional[str] = None,
) -> torch.Tensor:
    """The whole data section of `file` as a uint8 tensor on `device`.

    `direct`: read past the page cache; `None` (the default) decides by how
    much of the file is cached (`File.prefers_direct_reads`, the CPU loads'
    policy). `schedule`: "native" (the default, but on ROCm builds of
    torch), "ring" or "readers", as the module's docstring describes.
    `chunk_bytes` and `ring` (slots) default to the schedule's `DEFAULTS`;
    `threads` to one per slot and core, up to MAX_THREADS."""
    fall_back = schedule is None
    if schedule is None:
        schedule = "ring" if getattr(torch.version, "hip", None) or _native_refused else "native"
    if schedule not in ("ring", "readers", "native"):
        raise ValueError(f'schedule must be "ring", "readers" or "native", got {schedule!r}')
    total = file.data_len
    out = torch.empty(total, dtype=torch.uint8, device=torch.device(device))
    # `out.device` has its index even when `device` had none ("cuda"): other
    # threads, whose current device may differ, must use the same one.
    target = out.device
    cuda = target.type == "cuda"
    if total == 0:
        return out
    # The caller's stream: copies into `out` wait for the work queued on it
    # (the allocator may hand out memory that work is still using).
    caller = torch.cuda.current_stream(target) if cuda else None
    if direct is None:
        direct = file.prefers_direct_reads()
    asked = (chunk_bytes, ring, threads)

    def plan(schedule: str) -> Tuple[List[Tuple[int, int, int]], List[torch.Tensor], int]:
        """Chunks, staging slots and reader threads for `schedule`."""
        chunk_default, ring_default = DEFAULTS[schedule]
        chunks = _plan_chunks(file.data_start, total, asked[0] or chunk_default, direct)
        slots = max(1, min(asked[1] or ring_default, len(chunks)))
        staging = _staging_slots(slots, max(place + length for _, length, place in chunks), pinned=cuda, page_aligned=direct)
        if stats is not None:
            stats.pinned_bytes = sum(buf.numel() for buf in staging)
            stats.direct = direct
        return chunks, staging, asked[2] or default_threads(slots)

    if schedule == "native":
        try:
            _load_natively(file, *plan(schedule), out, caller, direct, progress, stats)
            return out
        except NativeStagingUnavailable as e:
            if not fall_back:
                raise
            _refuse_native(str(e))
            schedule = "ring"
    # The Python schedules (asked for, or the native one could not start).
    chunks, staging, threads = plan(schedule)
    ring = len(staging)
    progress = _every_step(progress, total)
    direct_bytes = [0] * len(chunks)
    reading, reading_lock = [0], threading.Lock()

    def read(index: int, into: torch.Tensor) -> None:
        """Chunk `index` into `into` (its place in a slot, `_place`)."""
        with reading_lock:
            reading[0] += 1
            if stats is not None:
                stats.max_in_flight = max(stats.max_in_flight, reading[0])
        try:
            direct_bytes[index] = file.read_data_into(chunks[index][0], into.numpy(), direct=direct)
        finally:
            with reading_lock:
                reading[0] -= 1

    if schedule == "readers":
        _load_by_readers(chunks, staging, read, out, caller, threads, direct, progress, stats)
        if stats is not None:
            stats.direct_bytes = sum(direct_bytes)
        return out

    streams = [_side_stream(caller) for _ in range(2)] if cuda else []
    copied: List[Any] = [None] * ring  # per slot: CUDA event recorded after the copy out of it

    def slot_view(index: int) -> torch.Tensor:
        _, length, place = chunks[index]
        return _place(staging[index % ring], place, length, direct)

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            pending = {}
            next_read = 0
            done_bytes = 0
            for index, (start, length, _) in enumerate(chunks):
                # Keep up to `ring` reads in flight; a slot is reused only after
                # the copy out of it has completed.
                while next_read < len(chunks) and next_read < index + ring:
                    slot = next_read % ring
                    if copied[slot] is not None:
                        copied[slot].synchronize()
                        copied[slot] = None
                    pending[next_read] = pool.submit(read, next_read, slot_view(next_read))
                    next_read += 1
                pending.pop(index).result()
                copied[index % ring] = _copy_out(out, start, slot_view(index), streams[index % 2] if cuda else None)
                done_bytes += length
                if stats is not None:
                    stats.chunks += 1
                if progress is not None:
                    progress(done_bytes, total)
    finally:
        # Also on errors: `out` goes back to the caller's stream only after
        # the copies into it (its memory could otherwise be handed out while
        # they still write).
        for stream in streams:
            caller.wait_stream(stream)
    if stats is not None:
        stats.direct_bytes = sum(direct_bytes)
    return out


def _slot_start(slot: torch.Tensor, direct: bool) -> int:
    """Where chunks' places in `slot` count from: its first page boundary
    when reading directly, else its start."""
    return (-slot.data_ptr()) % DIRECT_ALIGN if direct else 0


def _place(slot: torch.Tensor, place: int, length: int, direct: bool) -> torch.Tensor:
    """Where a chunk lands in `slot`: at its file offset's place within a
    page when reading directly, else at the slot's start."""
    skip = place + _slot_start(slot, direct)
    return slot[skip : skip + length]


def _copy_out(out: torch.Tensor, start: int, view: torch.Tensor, stream: Any) -> Any:
    """Copies `view` into `out` at `start`: asynchronously on `stream`,
    returning an event recorded after the copy, or at once (CPU targets,
    `stream` None), returning None."""
    if stream is None:
        out[start : start + view.numel()].copy_(view)
        return None
    with torch.cuda.device(out.device), torch.cuda.stream(stream):
        out[start : start + view.numel()].copy_(view, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    return event


def _side_stream(caller: Any) -> Any:
    """A new stream on `caller`'s device that starts after the work queued
    on `caller` so far."""
    stream = torch.cuda.Stream(caller.device)
    stream.wait_stream(caller)
    return stream


def _every_step(progress: Optional[Callable[[int, int], Any]], total: int) -> Optional[Callable[[int, int], Any]]:
    """`progress`, called every `PROGRESS_STEP` bytes (the first time at
    that many) and at the end, as the native schedule reports."""
    if progress is None:
        return None
    due = [PROGRESS_STEP]

    def report(done: int, total: int) -> None:
        if done >= due[0] or done == total:
            due[0] = done + PROGRESS_STEP
            progress(done, total)

    return report


def _load_natively(file, chunks, staging, threads, out, caller, direct, progress, stats) -> None:
    """The native schedule: the readers schedule run by `stage_data` in Rust. Each
    slot is handed over from where chunks' places in it count
    (`_slot_start`); a CUDA target is given as torch's device pointer, length and the
    caller's raw stream, which the copies start after. The data is on the
    device when this returns."""
    slots = [slot[_slot_start(slot, direct) :].numpy() for slot in staging]
    if caller is not None:
        target = (out.device.index, out.data_ptr(), out.numel(), caller.cuda_stream)
    else:
        target = out.numpy()
    count, max_reading, direct_bytes = stage_data(file, chunks, slots, threads, target, direct=direct, progress=progress)
    if stats is not None:
        stats.chunks, stats.max_in_flight, stats.direct_bytes = count, max_reading, direct_bytes


def _load_by_readers(chunks, staging, read, out, caller, threads, direct, progress, stats) -> None:
    """The readers schedule: no central scheduler. Each reader (`threads`, at most one
    per slot) owns every `readers`-th slot and its own stream (after
    `caller`'s work; `None` for CPU targets); it takes the next chunk (any
    order), waits until its slot's last copy has completed, reads into the
    slot and issues the copy. The main thread only reports progress."""
    cuda = caller is not None
    readers = max(1, min(threads, len(staging)))
    next_chunk = itertools.count()  # next() on it is atomic under the GIL
    finished: "queue.SimpleQueue[int]" = queue.SimpleQueue()
    failed = threading.Event()
    first_error: List[BaseException] = []  # the error that stopped the load, not its consequences
    error_lock = threading.Lock()

    def stop(error: BaseException) -> None:
        with error_lock:
            if not first_error:
                first_error.append(error)
        failed.set()

    def reader(r: int) -> None:
        own = staging[r::readers]
        stream = _side_stream(caller) if cuda else None
        copied: List[Any] = [None] * len(own)
        turn = 0
        try:
            while not failed.is_set():
                index = next(next_chunk)
                if index >= len(chunks):
                    return
                slot = turn % len(own)
                turn += 1
                if copied[slot] is not None:
                    copied[slot].synchronize()
                start, length, place = chunks[index]
                view = _place(own[slot], place, length, direct)
                read(index, view)
                copied[slot] = _copy_out(out, start, view, stream)
                finished.put(length)
        except BaseException as e:
            stop(e)
        finally:
            for event in copied:  # the slots outlive no copy out of them
                if event is not None:
                    try:
                        event.synchronize()
                    except BaseException as e:
                        stop(e)

    total = out.numel()
    done = 0
    with ThreadPoolExecutor(max_workers=readers) as pool:
        futures = [pool.submit(reader, r) for r in range(readers)]
        try:
            while done < total and not failed.is_set():
                try:
                    done += finished.get(timeout=0.05)
                except queue.Empty:
                    if all(future.done() for future in futures) and finished.empty():
                        break  # every reader has stopped
                    continue
                if stats is not None:
                    stats.chunks += 1
                if progress is not None:
                    progress(done, total)
        except BaseException as e:  # a progress callback, Ctrl-C: the readers stop too
            stop(e)
    if first_error:
        raise first_error[0]
    if done < total:
        raise RuntimeError(f"staging readers stopped after {done} of {total} bytes")
