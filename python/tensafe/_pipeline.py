"""Loading a file's data section onto an accelerator through a ring of pinned
staging buffers.

Reader threads fill the staging buffers (positional reads, no GIL) while
earlier chunks are copied to the device asynchronously on two streams, so disk
reads and host-to-device copies overlap. The staging memory is allocated once
per load and bounded: `ring × chunk_bytes` bytes, never more. The result is
one device allocation; tensors are views of it.

The scheduling does not depend on CUDA: with a CPU target the copies are
plain synchronous copies, which is how the tests check it on machines
without a GPU.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Optional

import torch

from ._tensafe_rust import File

#: Defaults chosen for PCIe/NVLink hosts: 64 MiB chunks are large enough for
#: full-speed copies, 4 of them keep readers and copy engines busy.
CHUNK_BYTES = 64 << 20
RING = 4


class StagingStats:
    """What a load used, for callers and tests: peak pinned bytes and chunks."""

    def __init__(self) -> None:
        self.pinned_bytes = 0
        self.chunks = 0


def load_data_section(
    file: File,
    device: Any,
    *,
    chunk_bytes: int = CHUNK_BYTES,
    ring: int = RING,
    threads: Optional[int] = None,
    progress: Optional[Callable[[int, int], Any]] = None,
    stats: Optional[StagingStats] = None,
) -> torch.Tensor:
    """The whole data section of `file` as a uint8 tensor on `device`."""
    total = file.data_len
    target = torch.device(device)
    cuda = target.type == "cuda"
    out = torch.empty(total, dtype=torch.uint8, device=target)
    if total == 0:
        return out
    chunk_bytes = max(1, min(chunk_bytes, total))
    ring = max(1, ring)
    staging: List[torch.Tensor] = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(ring)]
    if stats is not None:
        stats.pinned_bytes = sum(buf.numel() for buf in staging)
    streams = [torch.cuda.Stream(target) for _ in range(2)] if cuda else []
    copied: List[Any] = [None] * ring  # CUDA event per slot: its copy has finished
    chunks = [(start, min(chunk_bytes, total - start)) for start in range(0, total, chunk_bytes)]

    def read(index: int) -> int:
        start, length = chunks[index]
        file.read_data_into(start, staging[index % ring][:length].numpy())
        return index

    with ThreadPoolExecutor(max_workers=threads or min(ring, 4)) as pool:
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
