"""Bulk loads: lazy mmap views and parallel pread into one allocation, bit-exact
against the reference, for every dtype and awkward sizes."""

import os
import pathlib
import threading
import time

import numpy as np
import pytest
import torch

import safetensors
import safetensors.numpy as ref_np
import safetensors.torch as ref_pt
import tensafe
import tensafe.numpy as ts_np
import tensafe.torch as ts_pt

from conftest import evict, resident_fraction, seconds_until_a_signal_stops, stops_early
from test_reference_diff import TORCH_DTYPES, as_bytes, random_tensor


def assert_same(ours, theirs):
    # The reference orders tensors by offset; empty tensors at one offset tie
    # and come in its hash map's order, which changes from process to process.
    assert sorted(ours) == sorted(theirs)
    assert [n for n in ours if ours[n].numel()] == [n for n in theirs if theirs[n].numel()]
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and ours[name].shape == theirs[name].shape, name
        assert torch.equal(as_bytes(ours[name]), as_bytes(theirs[name])), name


@pytest.fixture(scope="module")
def every_dtype_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("load") / "all.safetensors"
    tensors = {}
    for i, dtype in enumerate(TORCH_DTYPES):
        for j, shape in enumerate([(0,), (3, 4), (1, 2, 2)]):
            tensors[f"{dtype}.{j}"] = random_tensor(dtype, shape, 10 * i + j)
    ref_pt.save_file(tensors, path)
    return path


@pytest.fixture(scope="module")
def many_chunks_file(tmp_path_factory):
    """625 KiB of data starting at an odd offset: about 157 staging chunks of 4 KiB."""
    path = tmp_path_factory.mktemp("chunks") / "chunks.safetensors"
    ref_pt.save_file({"odd": torch.arange(7, dtype=torch.int8), "x": torch.randn(100_003), "y": torch.arange(30_001, dtype=torch.int64)}, path)
    return path


@pytest.mark.parametrize("backend", ["mmap", "pread", "auto"])
@pytest.mark.parametrize("threads", [1, 3, 8])
def test_bulk_load_matches_the_reference(every_dtype_file, backend, threads):
    ours = ts_pt.load_file(every_dtype_file, backend=backend, threads=threads)
    assert_same(ours, ref_pt.load_file(every_dtype_file))


@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_a_bad_thread_count_is_refused_on_every_backend(tmp_path, backend):
    path = tmp_path / "m.safetensors"
    ts_pt.save_file({"w": torch.ones(4)}, path)
    for threads in (0, -1, "4", True):
        with pytest.raises(ValueError, match="threads must be an integer >= 1"):
            ts_pt.load_file(path, backend=backend, threads=threads)
    for threads in (np.int64(2), 2**64):  # past any machine's: as many as can be used
        assert torch.equal(ts_pt.load_file(path, backend=backend, threads=threads)["w"], torch.ones(4))


def test_several_files_and_slices(tmp_path):
    files = []
    for k in range(3):
        path = tmp_path / f"model-{k}.safetensors"
        ref_pt.save_file({f"l{k}.w": torch.randn(64, 32), f"l{k}.b": torch.randn(32).to(torch.bfloat16)}, path)
        files.append(path)
    merged = {}
    for path in files:
        merged.update(ts_pt.load_file(path, backend="pread", threads=2))
    expected = {}
    for path in files:
        expected.update(ref_pt.load_file(path))
    assert_same(merged, expected)
    with tensafe.safe_open(files[1], "pt", backend="pread") as f:
        assert torch.equal(f.get_slice("l1.w")[10:20, ::3], expected["l1.w"][10:20, ::3])


def test_fifty_thousand_tiny_tensors(tmp_path):
    path = tmp_path / "tiny.safetensors"
    tensors = {f"e.{i}": torch.full((2,), float(i)) for i in range(50_000)}
    ts_pt.save_file(tensors, path)
    for backend in ("mmap", "pread"):
        loaded = ts_pt.load_file(path, backend=backend)
        assert len(loaded) == 50_000
        assert loaded["e.49999"].tolist() == [49999.0, 49999.0]
        assert_same(dict(list(loaded.items())[:100]), dict(list(ref_pt.load_file(path).items())[:100]))


def test_one_large_tensor_with_progress_and_cache_drop(page_cache_control, tmp_path):
    path = tmp_path / "huge.safetensors"
    big = torch.arange(48 * 1024 * 1024, dtype=torch.int32)  # 192 MiB
    ts_pt.save_file({"big": big, "empty": torch.zeros(0)}, path)
    seen = []
    path.read_bytes()  # in the page cache, so that the drop is seen
    assert resident_fraction(path) > 0.9
    loaded = ts_pt.load_file(path, backend="pread", threads=4, progress=lambda done, total: seen.append((done, total)), drop_cache=True)
    assert resident_fraction(path) < 0.1
    assert torch.equal(loaded["big"], big) and loaded["empty"].shape == (0,)
    total = big.numel() * 4
    assert seen and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_progress_is_in_order_and_can_stop_a_load_on_every_backend(tmp_path):
    path = tmp_path / "m.safetensors"
    ts_pt.save_file({"a": torch.arange(40 * 1024 * 1024, dtype=torch.int32), "b": torch.ones(3)}, path)

    class Cancel(Exception):
        pass

    for backend in ("pread", "mmap"):
        for threads in (1, 8):
            seen = []
            ts_pt.load_file(path, backend=backend, threads=threads, progress=lambda done, total: seen.append((done, total)))
            done = [d for d, _ in seen]
            assert done == sorted(done) and seen[-1][0] == seen[-1][1], (backend, seen)

            def cancel(done, total):
                raise Cancel(done)

            # The callback's exception ends the load and is raised by it.
            with pytest.raises(Cancel):
                ts_pt.load_file(path, backend=backend, threads=threads, progress=cancel)


def test_engine_reads_in_bounded_chunks(tmp_path):
    path = tmp_path / "chunks.safetensors"
    ts_np.save_file({"x": np.arange(1_000_000, dtype=np.int64)}, path)
    from tensafe._tensafe_rust import File

    f = File(str(path), "pread")
    dst = np.empty(f.data_len, dtype=np.uint8)
    reads = f.read_all_into(dst, threads=3, chunk_bytes=1 << 20)
    assert reads == -(-f.data_len // (1 << 20))
    assert np.array_equal(dst.view(np.int64), np.arange(1_000_000))
    with pytest.raises(ValueError, match="writable contiguous buffer"):
        f.read_all_into(np.empty(10, dtype=np.uint8))


def test_unaligned_tensors_from_other_writers(tmp_path):
    # A U8 tensor first leaves the F32 one at data offset 2; the reference
    # writer never does that, but other writers may and readers must cope.
    header = b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"F32","shape":[2],"data_offsets":[2,10]}}'
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x01\x02" + np.array([1.5, -2.0], "<f4").tobytes())
    for backend in ("mmap", "pread"):
        loaded = ts_pt.load_file(path, backend=backend)
        assert loaded["a"].tolist() == [1, 2] and loaded["b"].tolist() == [1.5, -2.0]
        assert ts_np.load_file(path, backend=backend)["b"].tolist() == [1.5, -2.0]
    assert safetensors.safe_open(path, "np").get_tensor("b").tolist() == [1.5, -2.0]


def test_bulk_loads_leave_the_garbage_collector_as_they_found_it(tmp_path):
    import gc

    path = tmp_path / "gc.safetensors"
    ts_pt.save_file({f"t{i}": torch.zeros(i + 1) for i in range(200)}, path)
    assert gc.isenabled()
    threads = [threading.Thread(target=lambda: [ts_pt.load_file(path) for _ in range(20)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert gc.isenabled()
    gc.disable()
    try:
        ts_pt.load_file(path)
        assert not gc.isenabled(), "a caller's disabled collector stays disabled"
    finally:
        gc.enable()


def test_the_collector_runs_while_bytes_are_read_and_a_fork_does_not_inherit_a_pause(tmp_path):
    import gc

    path = tmp_path / "gc.safetensors"
    ts_pt.save_file({f"t{i}": torch.zeros(1 << 16) for i in range(64)}, path)
    # The pause covers making the tensors only: other threads collect during the reads.
    seen = []
    ts_pt.load_file(path, backend="pread", threads=2, progress=lambda done, total: seen.append(gc.isenabled()))
    assert seen and all(seen), seen
    # A child forked while another thread holds a pause collects as usual.
    from tensafe._open import _gc_paused

    holding, release = threading.Event(), threading.Event()

    def hold():
        with _gc_paused():
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(30)
    try:
        assert not gc.isenabled()
        child = os.fork()
        if child == 0:
            ok = gc.isenabled()
            ts_pt.load_file(path)
            os._exit(0 if ok and gc.isenabled() else 1)
        code = exit_code_within(child, 60)
    finally:
        release.set()
        holder.join()
    assert code == 0, f"the forked child failed (exit status {code})"
    assert gc.isenabled()


def exit_code_within(pid: int, seconds: float):
    """The exit code of child `pid`, or None if it ran `seconds` (then killed):
    a stuck child fails its test instead of holding the whole run."""
    deadline = time.monotonic() + seconds
    while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if ended[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return None
    return os.waitstatus_to_exitcode(ended[1])


def test_a_file_written_in_place_during_a_read_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    # 24 MiB: three of the engine's 8 MiB reads, with progress between them.
    ts_pt.save_file({f"t{i}": torch.ones(1 << 20) for i in range(6)}, path)
    os.utime(path, (0, 0))  # so that the write below changes the time whatever the clock's granularity
    data_start = 8 + int.from_bytes(path.read_bytes()[:8], "little")

    def rewrite(done, total):
        if done < total:
            with open(path, "r+b") as f:  # in place, no truncation, as another process would
                f.seek(data_start)
                f.write(torch.full((1 << 16,), 2.0).numpy().tobytes())

    with pytest.raises(tensafe.SafetensorError, match="changed while it was read"):
        ts_pt.load_file(path, backend="pread", threads=1, progress=rewrite)
    # What changes no byte (mode, links, a rename and back) is no change.
    os.utime(path, (0, 0))

    def touch_metadata(done, total):
        if done < total:
            os.chmod(path, 0o600)
            os.link(path, tmp_path / "link")
            os.rename(path, tmp_path / "moved")
            os.rename(tmp_path / "moved", path)

    ts_pt.load_file(path, backend="pread", threads=1, progress=touch_metadata)
    # Unchanged, it loads; an empty data section reports its end too.
    assert torch.equal(ts_pt.load_file(path, backend="pread")["t0"][: 1 << 16], torch.full((1 << 16,), 2.0))
    ts_pt.save_file({"empty": torch.zeros(0)}, path)
    for backend in ("mmap", "pread"):
        heard = []
        ts_np.load_file(path, backend=backend, progress=lambda *a: heard.append(a), drop_cache=True)
        assert heard == [(0, 0)], (backend, heard)


def test_a_load_whose_reader_threads_cannot_start_raises(tmp_path):
    path = tmp_path / "t.safetensors"
    ts_pt.save_file({"w": torch.ones(1000)}, path)
    # Every thread's stack is refused: a Python error, not a PanicException.
    script = (
        "import tensafe.numpy as t, sys\n"
        "try:\n    t.load_file(sys.argv[1], backend='pread', threads=4)\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", script, str(path)], env={**os.environ, "RUST_MIN_STACK": str(1 << 40)}, capture_output=True, text=True, timeout=120)
    assert "SafetensorError" in out.stdout and "cannot start a reader thread" in out.stdout, (out.stdout, out.stderr)


def test_mapped_tensors_hold_no_descriptor_once_the_file_is_closed(tmp_path):
    # As the reference's: a process may keep the tensors of thousands of files.
    paths = [tmp_path / f"f{i}.safetensors" for i in range(20)]
    for i, path in enumerate(paths):
        ts_pt.save_file({"w": torch.full((1 << 12,), float(i))}, path)
    before = len(os.listdir("/proc/self/fd"))
    kept = [ts_pt.load_file(path) for path in paths]
    # Their background reads into the page cache go through the mapping, not the file.
    assert len(os.listdir("/proc/self/fd")) <= before
    assert [float(k["w"][0]) for k in kept] == list(range(20))
    # An open handle holds one until it is closed; its tensors outlive it.
    with tensafe.safe_open(paths[3], "pt") as f:
        assert len(os.listdir("/proc/self/fd")) == before + 1
        w = f.get_tensor("w")
    del f
    assert len(os.listdir("/proc/self/fd")) <= before and float(w[7]) == 3.0


def _chunk_count(file, chunk, direct):
    """How many chunks the staging pipeline reads, worked out on its own: for
    direct reads the data section is cut at multiples of the page-rounded
    chunk in the file, otherwise every `chunk` bytes."""
    if not direct:
        return -(-file.data_len // chunk)
    pages = max(4096, chunk // 4096 * 4096)
    return (file.data_start + file.data_len - 1) // pages - file.data_start // pages + 1


@pytest.mark.parametrize("backend", ["mmap", "pread"])
@pytest.mark.parametrize("chunk,ring,threads", [(4096, 1, 1), (65536, 3, 2), (16384, 4, 4), (8192, 8, 3)])
@pytest.mark.parametrize("schedule", ["ring", "readers", "native"])
@pytest.mark.parametrize("direct", [False, True])
def test_staging_pipeline_is_exact_and_bounded(many_chunks_file, backend, chunk, ring, threads, schedule, direct):
    """The accelerator pipeline's scheduling, run with a CPU target; the
    "readers" and "native" (the default) schedules let each reader copy what
    it read, in Python or on Rust threads."""
    from tensafe._pipeline import StagingStats, load_data_section
    from tensafe._tensafe_rust import DIRECT_ALIGN, File

    file = File(str(many_chunks_file), backend)
    stats, seen = StagingStats(), []
    data = load_data_section(file, "cpu", chunk_bytes=chunk, ring=ring, threads=threads, progress=lambda d, t: seen.append(d),
                             stats=stats, direct=direct, schedule=schedule)
    raw = many_chunks_file.read_bytes()
    assert bytes(data.numpy()) == raw[file.data_start :]
    expected = _chunk_count(file, chunk, direct)
    assert stats.chunks == expected and expected > ring
    # Every schedule reports every PROGRESS_STEP (more than this file) and
    # once at the end.
    assert seen == [file.data_len]
    assert stats.direct == direct and (stats.direct_bytes > 0) == direct
    assert stats.pinned_bytes <= ring * (chunk + (DIRECT_ALIGN if direct else 0))
    assert 1 <= stats.max_in_flight <= min(ring, threads)
    assert seen == sorted(seen) and seen[-1] == file.data_len


@pytest.mark.parametrize("hip,expected", [(None, "native"), ("6.4.0", "ring")])
def test_the_default_schedule_is_native_but_on_rocm(many_chunks_file, monkeypatch, hip, expected):
    """The native schedule talks to NVIDIA's driver itself, so a ROCm build
    of torch (whose "cuda" is HIP) gets the ring."""
    import tensafe._pipeline as pipeline
    from tensafe._tensafe_rust import File

    monkeypatch.setattr(torch.version, "hip", hip)
    used = []
    for name, schedule in (("_load_natively", "native"), ("_load_by_readers", "readers")):
        real = getattr(pipeline, name)
        monkeypatch.setattr(pipeline, name, lambda *a, real=real, schedule=schedule: used.append(schedule) or real(*a))
    data = pipeline.load_data_section(File(str(many_chunks_file), "pread"), "cpu", chunk_bytes=4096, ring=4, direct=False)
    assert bytes(data.numpy()) == many_chunks_file.read_bytes()[-data.numel():]
    assert (used or ["ring"]) == [expected]


def test_an_unknown_schedule_is_refused(many_chunks_file):
    from tensafe._pipeline import load_data_section
    from tensafe._tensafe_rust import File

    with pytest.raises(ValueError, match="schedule"):
        load_data_section(File(str(many_chunks_file), "pread"), "cpu", schedule="reader")


class _FailingReads:
    """A File whose `fail_at`-th read fails (counted under a lock: readers
    race); each read takes 20 ms, so that the main thread keeps up and "soon"
    (20 reads: about 0.2 s with two readers) holds on a loaded machine too."""

    def __init__(self, file, fail_at):
        self.file, self.fail_at, self.reads, self.lock = file, fail_at, 0, threading.Lock()

    def __getattr__(self, name):
        return getattr(self.file, name)

    def read_data_into(self, *args, **kwargs):
        with self.lock:
            self.reads += 1
            fail = self.reads == self.fail_at
        if fail:
            raise OSError("disk gone")
        time.sleep(0.02)
        return self.file.read_data_into(*args, **kwargs)


@pytest.mark.parametrize("schedule", ["ring", "readers"])
def test_a_read_error_stops_the_load_soon(many_chunks_file, schedule):
    from tensafe._pipeline import load_data_section
    from tensafe._tensafe_rust import File

    failing = _FailingReads(File(str(many_chunks_file), "pread"), 3)
    with pytest.raises(OSError, match="disk gone"):
        load_data_section(failing, "cpu", chunk_bytes=4096, ring=4, threads=2, direct=False, schedule=schedule)
    assert failing.reads < 20, "the other readers stopped soon after the error"


def test_a_failing_progress_callback_stops_the_readers(file_of_a_few_steps):
    from tensafe._pipeline import load_data_section
    from tensafe._tensafe_rust import PROGRESS_STEP, File

    counting = _FailingReads(File(str(file_of_a_few_steps), "pread"), None)

    def progress(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        load_data_section(counting, "cpu", chunk_bytes=1 << 20, ring=4, threads=2, direct=False, schedule="readers", progress=progress)
    # The first report comes after a progress step (64 chunks) of 161.
    assert counting.reads < PROGRESS_STEP // (1 << 20) + 20, "the readers stopped soon after the callback failed"


def test_the_native_schedule_reports_a_file_cut_short(many_chunks_file, tmp_path):
    """A file truncated under an open handle: the Rust readers' error comes
    back as the read's own exception."""
    from tensafe._pipeline import load_data_section
    from tensafe._tensafe_rust import File, SafetensorError

    path = tmp_path / "cut.safetensors"
    path.write_bytes(many_chunks_file.read_bytes())
    file = File(str(path), "pread")
    os.truncate(path, file.data_start + file.data_len // 2)
    with pytest.raises(SafetensorError, match="failed to fill whole buffer"):
        load_data_section(file, "cpu", chunk_bytes=4096, ring=4, threads=2, direct=False, schedule="native")


def test_reads_of_a_file_cut_short_fail_with_the_references_words(tmp_path):
    path = tmp_path / "cut.safetensors"
    ts_pt.save_file({"a": torch.ones(10), "b": torch.ones(1000)}, path)
    ours, theirs = tensafe.safe_open(path, "pt", backend="pread"), safetensors.safe_open(path, "pt", backend="pread")
    os.truncate(path, os.path.getsize(path) - 100)
    for get, words in ((lambda f: f.get_tensor("b"), "Could not read tensor b from file: "), (lambda f: f.get_slice("b")[:], "Could not read tensor bytes for slicing: ")):
        messages = []
        for f in (ours, theirs):
            with pytest.raises(Exception) as info:
                get(f)
            messages.append(str(info.value))
        assert messages[0].startswith(words) and messages[1].startswith(words), messages


@pytest.fixture(scope="module")
def file_of_a_few_steps(tmp_path_factory):
    """Data of 2.5 progress steps (160 MiB) and a few bytes, at an odd offset."""
    from tensafe._tensafe_rust import PROGRESS_STEP

    path = tmp_path_factory.mktemp("steps") / "steps.safetensors"
    ts_np.save_file({"odd": np.arange(3, dtype=np.int8), "x": np.arange(5 * PROGRESS_STEP // 8, dtype=np.float32)}, path)
    return path


@pytest.mark.parametrize("schedule", ["native", "ring", "readers"])
def test_every_schedule_reports_progress_every_step_and_at_the_end(file_of_a_few_steps, schedule):
    from tensafe._pipeline import load_data_section
    from tensafe._tensafe_rust import PROGRESS_STEP, File

    file, seen = File(str(file_of_a_few_steps), "pread"), []
    data = load_data_section(file, "cpu", chunk_bytes=1 << 20, ring=8, threads=2, direct=False, schedule=schedule,
                             progress=lambda done, total: seen.append((done, total)))
    assert bytes(data[:4096].numpy()) == file_of_a_few_steps.read_bytes()[file.data_start :][:4096]
    total = file.data_len
    assert [t for _, t in seen] == [total] * len(seen) and seen[-1][0] == total
    done = [d for d, _ in seen]
    assert len(done) == 3 and done == sorted(done), done  # two steps, then the end
    assert all(b - a >= PROGRESS_STEP for a, b in zip([0, *done[:-2]], done[:-1])), done


def test_the_native_schedule_passes_a_progress_error_through(file_of_a_few_steps):
    from tensafe._pipeline import load_data_section
    from tensafe._tensafe_rust import PROGRESS_STEP, File

    calls = []

    def progress(done, total):
        calls.append(done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        load_data_section(File(str(file_of_a_few_steps), "pread"), "cpu", chunk_bytes=1 << 20, ring=4, threads=2, direct=False,
                          schedule="native", progress=progress)
    assert len(calls) == 1 and calls[0] < 2 * PROGRESS_STEP, "the first report raised, midway, and no more came"


def test_a_default_load_falls_back_to_the_ring_when_the_native_schedule_cannot_start(many_chunks_file, monkeypatch):
    """A driver that cannot serve the native schedule (a stub libcuda, another
    driver than torch's) is found before anything is read: a load that did
    not ask for a schedule warns once and goes through torch's copies."""
    import tensafe._pipeline as pipeline
    from tensafe._tensafe_rust import File, NativeStagingUnavailable

    def refuse(*args, **kwargs):
        attempts.append(1)
        raise NativeStagingUnavailable("the CUDA driver library (libcuda) could not be loaded")

    attempts = []
    monkeypatch.setattr(pipeline, "stage_data", refuse)
    monkeypatch.setattr(pipeline, "_native_refused", None)
    monkeypatch.setattr(torch.version, "hip", None)
    want = many_chunks_file.read_bytes()
    file = File(str(many_chunks_file), "pread")
    with pytest.warns(RuntimeWarning, match="instead of the native schedule: the CUDA driver library"):
        first = pipeline.load_data_section(file, "cpu", chunk_bytes=4096, ring=4, direct=False)
    assert bytes(first.numpy()) == want[file.data_start :] and attempts == [1]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = pipeline.load_data_section(file, "cpu", chunk_bytes=4096, ring=4, direct=False)
    assert bytes(again.numpy()) == want[file.data_start :] and attempts == [1], "the ring at once, without a second warning"
    with pytest.raises(NativeStagingUnavailable):
        pipeline.load_data_section(file, "cpu", chunk_bytes=4096, ring=4, direct=False, schedule="native")


def test_the_native_schedule_refuses_overlapping_or_read_only_buffers(many_chunks_file):
    from tensafe._tensafe_rust import File, stage_data

    file = File(str(many_chunks_file), "pread")
    out, memory = np.zeros(file.data_len, np.uint8), np.zeros(8192, np.uint8)
    with pytest.raises(ValueError, match="must not overlap"):
        stage_data(file, [(0, 4096, 0)], [memory, memory[4096:]], 2, out, direct=False)
    with pytest.raises(ValueError, match="must not overlap"):
        stage_data(file, [(0, 4096, 0)], [out[:8192]], 1, out, direct=False)
    with pytest.raises(ValueError, match="writable"):
        stage_data(file, [(0, 4096, 0)], [bytes(8192)], 1, out, direct=False)
    with pytest.raises(ValueError, match="outside the .*data section"):
        stage_data(file, [(file.data_len - 10, 4096, 0)], [memory], 1, out, direct=False)


_FAKE_DRIVER_CHILD = """
import ctypes, sys
import numpy as np
from tensafe._pipeline import _plan_chunks
from tensafe._tensafe_rust import File, NativeStagingUnavailable, stage_data

fake = ctypes.CDLL("libcuda.so")  # the fake, first on the library path
file = File(sys.argv[1], "pread")
device = np.zeros(file.data_len, np.uint8)
fake.fake_register(ctypes.c_uint64(device.ctypes.data), ctypes.c_size_t(device.nbytes), 2)  # device memory
fake.fake_counter.restype = ctypes.c_long
slots = [np.empty(8192, np.uint8) for _ in range(3)]
chunks = _plan_chunks(file.data_start, file.data_len, 8192, False)
seen = []
count, _, _ = stage_data(file, chunks, slots, 2, (0, device.ctypes.data, device.nbytes, 0), direct=False,
                         progress=lambda done, total: seen.append(done))
assert count == len(chunks) and seen == [file.data_len], seen  # once, when the copies have completed
assert device.tobytes() == open(sys.argv[1], "rb").read()[file.data_start:], "wrong bytes on the fake device"
for counter in (b"no_context", b"busy_destroys", b"pending", b"retained", b"streams", b"events"):
    assert fake.fake_counter(counter) == 0, (counter, fake.fake_counter(counter))
host = np.zeros(file.data_len, np.uint8)  # memory the driver does not know
try:
    stage_data(file, chunks, slots, 2, (0, host.ctypes.data, host.nbytes, 0), direct=False)
except NativeStagingUnavailable as e:
    assert "is not memory of CUDA device 0" in str(e), e
else:
    raise AssertionError("host memory was accepted as a device destination")
print("fake device load ok")
"""


def test_native_device_loads_through_a_fake_driver(many_chunks_file, tmp_path):
    """The binding's device target, without a GPU: a stand-in for libcuda
    (crates/tensafe-cuda/tests/fake_driver) that runs copies only when they
    are waited for, loaded in a child process that finds it first."""
    import shutil
    import subprocess
    import sys

    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) to build the fake driver")
    source = pathlib.Path(__file__).resolve().parents[2] / "crates/tensafe-cuda/tests/fake_driver/libcuda.c"
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(tmp_path / "libcuda.so"), str(source), "-lpthread"], check=True)
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("LD_LIBRARY_PATH")])))
    child = subprocess.run([sys.executable, "-c", _FAKE_DRIVER_CHILD, str(many_chunks_file)], env=env, capture_output=True, text=True)
    assert child.returncode == 0 and "fake device load ok" in child.stdout, child.stdout + child.stderr

    # A libcuda without the driver's functions (as a wrong library found
    # first would be): refused as unusable, not a crash or a Rust panic.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "libcuda.c").write_text("int not_a_driver;\n")
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(tmp_path / "empty" / "libcuda.so"), str(tmp_path / "empty" / "libcuda.c")], check=True)
    env["LD_LIBRARY_PATH"] = str(tmp_path / "empty")
    child = subprocess.run([sys.executable, "-c", _UNUSABLE_DRIVER_CHILD, str(many_chunks_file)], env=env, capture_output=True, text=True)
    assert child.returncode == 0 and "refused: the CUDA driver bindings failed: Missing symbol" in child.stdout, child.stdout + child.stderr


_UNUSABLE_DRIVER_CHILD = """
import sys
import numpy as np
from tensafe._tensafe_rust import File, NativeStagingUnavailable, stage_data

file = File(sys.argv[1], "pread")
try:
    stage_data(file, [(0, 4096, 0)], [np.empty(4096, np.uint8)], 1, (0, 1 << 40, file.data_len, 0), direct=False)
except NativeStagingUnavailable as e:
    print("refused:", e)
"""


@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_each_tensor_has_its_own_storage_like_the_reference(tmp_path, backend):
    import io

    path = tmp_path / "s.safetensors"
    ref_pt.save_file({"a": torch.ones(1000), "b": torch.arange(10), "c": torch.ones(3, dtype=torch.bfloat16)}, path)
    ours, theirs = ts_pt.load_file(path, backend=backend), ref_pt.load_file(path, backend=backend)
    for name in theirs:
        assert ours[name].untyped_storage().nbytes() == theirs[name].untyped_storage().nbytes() == theirs[name].nbytes
    # torch.save sees separate storages: mixed dtypes save, and one tensor saves only its bytes.
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    with tensafe.safe_open(path, "pt", backend=backend) as f:
        single = io.BytesIO()
        torch.save({"c": f.get_tensor("c")}, single)
    assert len(single.getvalue()) < 2000


def test_cold_private_loads_read_past_the_page_cache_and_stay_exact(page_cache_control, tmp_path):
    from tensafe._tensafe_rust import DIRECT_ALIGN, File

    path = tmp_path / "cold.safetensors"
    tensors = {"odd": torch.arange(7, dtype=torch.int8), "big": torch.randn(17 * 2**20 + 5), "tail": torch.arange(3, dtype=torch.int16)}
    ref_pt.save_file(tensors, path)
    f = File(str(path), "pread")
    assert f.data_start % DIRECT_ALIGN != 0, "the test wants an unaligned data section"
    raw = path.read_bytes()[f.data_start :]
    # Direct reads leave the page cache empty; a destination aligned unlike
    # the file, or direct=False, reads through it.
    aligned = f.data_start % DIRECT_ALIGN
    for shift, direct, past_the_cache in [(aligned, True, True), (aligned + 1, True, False), (aligned, False, False)]:
        evict(path)
        buffer = tensafe._tensafe_rust.HostBuffer(shift + f.data_len)
        dst = memoryview(buffer)[shift : shift + f.data_len]
        f.read_all_into(dst, threads=3, chunk_bytes=1 << 20, direct=direct)
        assert (resident_fraction(path) < 0.1) == past_the_cache, (shift, direct)
        assert bytes(dst) == raw, (shift, direct)
    # The default through the public API: direct when cold, exact cold and warm.
    evict(path)
    ours = ts_pt.load_file(path, backend="pread")
    assert resident_fraction(path) < 0.1
    assert_same(ours, ref_pt.load_file(path))
    assert_same(ts_pt.load_file(path, backend="pread"), ref_pt.load_file(path))


@pytest.mark.parametrize("backend", ["mmap", "pread"])
@pytest.mark.parametrize("chunk,ring", [(4096, 2), (65536 + 100, 3), (1 << 20, 4)])
def test_staging_pipeline_reads_past_the_page_cache_and_stays_exact(page_cache_control, tmp_path, backend, chunk, ring):
    """The accelerator pipeline's direct reads, with a CPU target: chunks cut
    at page boundaries of the file, only the section's first and last pages
    read through the cache."""
    from tensafe._pipeline import StagingStats, load_data_section
    from tensafe._tensafe_rust import DIRECT_ALIGN, File

    path = tmp_path / "staged.safetensors"
    ref_pt.save_file({"odd": torch.arange(7, dtype=torch.int8), "big": torch.randn(2**20 + 3)}, path)
    file = File(str(path), backend)
    assert file.data_start % DIRECT_ALIGN != 0, "the test wants an unaligned data section"
    raw = path.read_bytes()[file.data_start :]
    evict(path)
    stats = StagingStats()
    data = load_data_section(file, "cpu", chunk_bytes=chunk, ring=ring, stats=stats, direct=True)
    assert bytes(data.numpy()) == raw
    # Cuts at page boundaries of the file: only the section's first and last
    # pages are read through the cache. Slots get a page more only where
    # torch's CPU allocator gives memory that is not page-aligned.
    pages = chunk // DIRECT_ALIGN * DIRECT_ALIGN
    assert stats.direct and stats.pinned_bytes <= ring * (pages + DIRECT_ALIGN)
    assert stats.chunks == _chunk_count(file, chunk, True)
    assert file.data_len - 2 * DIRECT_ALIGN <= stats.direct_bytes <= file.data_len
    if chunk >= 1 << 20:
        assert resident_fraction(path) < 0.1


def test_staging_chunk_plan_covers_the_section_and_fits_the_slots():
    import itertools
    import random

    from tensafe._pipeline import _plan_chunks
    from tensafe._tensafe_rust import DIRECT_ALIGN

    rng = random.Random(7)
    for _ in range(500):
        data_start, total = rng.randrange(8, 3 * DIRECT_ALIGN), rng.randrange(1, 20 * DIRECT_ALIGN)
        chunk, direct = rng.choice([1, 100, DIRECT_ALIGN, 3 * DIRECT_ALIGN + 5, 8 * DIRECT_ALIGN]), rng.random() < 0.5
        chunks = _plan_chunks(data_start, total, chunk, direct)
        assert [c[0] for c in chunks] == [0, *itertools.accumulate(c[1] for c in chunks[:-1])]
        assert sum(c[1] for c in chunks) == total and all(c[1] > 0 for c in chunks)
        if direct:
            pages = max(DIRECT_ALIGN, chunk // DIRECT_ALIGN * DIRECT_ALIGN)
            assert all((data_start + offset) % DIRECT_ALIGN == place for offset, _, place in chunks)
            assert all((data_start + offset) % DIRECT_ALIGN == 0 for offset, _, _ in chunks[1:])
            assert max(place + length for _, length, place in chunks) <= pages
        else:
            assert all(place == 0 and length <= chunk for _, length, place in chunks)


def test_staging_pipeline_can_go_direct_by_itself_only_when_cold(page_cache_control, tmp_path):
    from tensafe._pipeline import StagingStats, load_data_section
    from tensafe._tensafe_rust import File

    path = tmp_path / "auto.safetensors"
    # Large enough for direct reads to pay (64 MiB and more).
    ref_pt.save_file({"x": torch.arange(17 * 2**20 + 3, dtype=torch.int32)}, path)
    raw = path.read_bytes()
    file = File(str(path), "pread")
    for cold in (True, False):
        if cold:
            evict(path)
        else:
            path.read_bytes()  # the direct load left it out of the cache
        assert file.prefers_direct_reads() == cold
        stats = StagingStats()
        data = load_data_section(file, "cpu", stats=stats)  # the default decides
        assert stats.direct == cold and (stats.direct_bytes > 0) == cold
        assert bytes(data.numpy()) == raw[file.data_start :]
        if cold:
            assert resident_fraction(path) < 0.1
    # A file in memory has no page cache to bypass: plain copies, even when asked.
    in_memory = File.from_bytes(raw)
    assert not in_memory.prefers_direct_reads()
    stats = StagingStats()
    assert bytes(load_data_section(in_memory, "cpu", stats=stats, direct=True).numpy()) == raw[file.data_start :]
    assert stats.direct_bytes == 0


def test_a_read_into_the_bytes_it_reads_from_is_refused():
    from tensafe._tensafe_rust import File

    raw = bytearray(ts_pt.save({"x": torch.arange(1024, dtype=torch.int32)}))
    file = File.from_bytes(raw)
    view = memoryview(raw)
    # Overlapping the file's own bytes (by one byte, or inside them): refused.
    for dst in (view[file.data_start - 1 : file.data_start + 15], view[-16:]):
        with pytest.raises(ValueError, match="must not share memory"):
            file.read_data_into(0, dst)
    # Apart from them: read.
    out = bytearray(16)
    file.read_data_into(0, out)
    assert bytes(out) == bytes(raw[file.data_start : file.data_start + 16])


def test_progress_true_draws_a_bar_and_bad_progress_is_refused(tmp_path, capsys):
    path = tmp_path / "bar.safetensors"
    ts_pt.save_file({"x": torch.zeros(3 * 2**20)}, path)
    loaded = ts_pt.load_file(path, backend="pread", progress=True)
    assert loaded["x"].shape == (3 * 2**20,)
    err = capsys.readouterr().err
    final = err.rstrip("\n").split("\r")[-1]
    assert final.startswith("loading [" + "=" * 30 + "] 12.0/12.0 MiB") and err.endswith("\n")
    with pytest.raises(TypeError, match="progress must be a callable"):
        ts_pt.load_file(path, backend="pread", progress="yes")
    assert ts_pt.load_file(path, backend="pread", progress=False)["x"].shape == (3 * 2**20,)



@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_drop_cache_evicts_the_open_file_even_after_its_path_is_replaced(page_cache_control, tmp_path, backend):
    import os

    from tensafe._tensafe_rust import File

    path = tmp_path / "cached.safetensors"
    ts_pt.save_file({"x": torch.arange(4 * 2**20, dtype=torch.int32)}, path)
    f = File(str(path), backend)
    path.read_bytes()  # into the page cache
    assert resident_fraction(path) > 0.9
    # Another file takes the name: the handle still drops its own file's pages.
    os.rename(path, tmp_path / "moved.safetensors")
    path.write_bytes(b"other")
    f.drop_cache()
    assert resident_fraction(tmp_path / "moved.safetensors") < 0.1


def test_drop_cache_keeps_the_pages_mapped_tensors_still_read(page_cache_control, tmp_path):
    """mmap tensors are views of the page cache: dropping it would turn every
    later access into a disk read. Private copies (pread) drop it."""
    path = tmp_path / "mapped.safetensors"
    ts_pt.save_file({"x": torch.arange(8 * 2**20, dtype=torch.int32)}, path)
    path.read_bytes()
    mapped = ts_pt.load_file(path, backend="mmap", drop_cache=True)
    assert resident_fraction(path) > 0.9
    copied = ts_pt.load_file(path, backend="pread", drop_cache=True)
    assert resident_fraction(path) < 0.1
    assert torch.equal(mapped["x"], copied["x"])


def test_a_signal_handler_stops_a_private_load_midway(tmp_path, request):
    """While a bulk `pread` load runs, the calling thread waits in Rust with the
    GIL released, yet runs Python's signal handlers every tick: Ctrl-C (here
    an alarm whose handler raises) stops a long load early, not after it."""
    path = tmp_path / "big.safetensors"
    ts_np.save_file({"x": np.resize(np.arange(251, dtype=np.uint8), (1 << 20, 1 << 10))}, path)
    request.addfinalizer(path.unlink)  # pytest keeps recent tmp_paths: not 1 GiB of them

    def cold_load():  # read from the disk, one reader: long enough to stop midway
        evict(path)
        start = time.perf_counter()
        ts_pt.load_file(path, backend="pread", threads=1)
        return time.perf_counter() - start

    cold_load()  # first allocations of this size can be slow: not measured
    full = cold_load()
    if full < 0.4:
        pytest.skip(f"a cold load takes {full:.2f} s here: too short to stop midway")

    stopped = stops_early(lambda: seconds_until_a_signal_stops(cold_load, after=0.05), full)
    assert stopped < full / 2, f"stopped after {stopped:.2f} s of a {full:.2f} s load"

    # A strided slice of a pread file too: every other row of 1 KiB, half a
    # million runs, read by the engine (one read each on this thread before,
    # which no signal stopped).
    def cold_slice():
        evict(path)
        start = time.perf_counter()
        with tensafe.safe_open(path, "pt", backend="pread") as f:
            rows = f.get_slice("x")[::2]
        assert rows.shape == (1 << 19, 1 << 10) and rows[3, 5] == (6 * 1024 + 5) % 251
        return time.perf_counter() - start

    cold_slice()  # not measured, as the load's first above
    full = cold_slice()
    if full < 0.4:
        pytest.skip(f"a cold strided slice takes {full:.2f} s here: too short to stop midway")
    stopped = stops_early(lambda: seconds_until_a_signal_stops(cold_slice, after=0.05), full)
    assert stopped < full / 2, f"stopped after {stopped:.2f} s of a {full:.2f} s slice"


def _wait_until_cached(path) -> None:
    deadline = time.monotonic() + 20
    while resident_fraction(path) < 0.99:
        assert time.monotonic() < deadline, f"only {resident_fraction(path):.0%} of the file is cached 20 s after the load"
        time.sleep(0.02)


def test_mmap_loads_fill_the_page_cache_in_the_background(page_cache_control, tmp_path):
    """A bulk load through the mapping (`load_file`'s default) starts reading
    the file into the page cache at once, ahead of the tensors' first touch,
    and `get_tensor` its tensor when that is large (1 MiB and more); a small
    tensor is left to the page faults, and nothing else is read."""
    path, big = tmp_path / "prefetched.safetensors", torch.arange(8 * 2**20, dtype=torch.int32)
    ref_pt.save_file({"a": torch.zeros(4096), "b": big}, path)  # "a" (16 KiB) is first
    evict(path)
    with tensafe.safe_open(path, "pt") as f:
        small = f.get_tensor("a")
        time.sleep(0.5)
        assert resident_fraction(path) < 0.1, "a small tensor's get_tensor read the file ahead"
        got = f.get_tensor("b")  # nothing touched
        _wait_until_cached(path)  # "b" is all but the first 16 KiB
    assert torch.equal(got, big)
    del small, got
    evict(path)
    loaded = ts_pt.load_file(path)  # nothing touched
    _wait_until_cached(path)
    assert torch.equal(loaded["b"], big)
    # Ranges outside the data section are refused, not read.
    from tensafe._tensafe_rust import File

    file = File(str(path), "mmap")
    for offset, length in [(file.data_len, 1), (1, file.data_len), (2**64 - 1, 2)]:
        with pytest.raises(ValueError, match="not in the data section"):
            file.prefetch_range(offset, length)
    file.prefetch_range(file.data_len, 0)  # empty, at the end: nothing to do


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_process_forked_after_a_load_reads_ahead_with_its_own_thread(page_cache_control, tmp_path):
    """The background thread does not survive a fork: a child forked after
    the parent's first load starts one of its own (not the parent's queue,
    which nothing serves there) and its loads still fill the page cache."""
    from tensafe._tensafe_rust import File

    path, expected = tmp_path / "forked.safetensors", np.arange(8 * 2**20, dtype=np.int32)
    ref_np.save_file({"x": expected}, path)
    parents = File(str(path), "mmap")
    parents.prefetch()  # what a mapped torch load asks: the parent's thread now runs
    assert bytes(parents.data_buffer()) == expected.tobytes()
    evict(path)
    pid = os.fork()
    if pid == 0:  # the binding only here: torch's thread pools are not fork-safe
        code = 1
        try:
            mapped, deadline = File(str(path), "mmap"), time.monotonic() + 20
            mapped.prefetch()  # nothing touched
            while resident_fraction(path) < 0.99 and time.monotonic() < deadline:
                time.sleep(0.02)
            code = 3 if resident_fraction(path) < 0.99 else 0 if bytes(mapped.data_buffer()) == expected.tobytes() else 4
        finally:
            os._exit(code)
    code = exit_code_within(pid, 60)
    assert code is not None, "the forked child's load did not end in 60 s"
    assert code != 3, "the forked child's load read nothing ahead in 20 s"
    assert code == 0, f"the forked child failed (exit status {code})"


def test_a_file_larger_than_memory_and_swap_opens_mapped(tmp_path):
    """The default backend maps a file privately (writable tensors, no write
    reaching the file) without reserving memory for it: the kernel's default
    overcommit check refused such a mapping larger than RAM and swap, where
    the reference's read-only mapping (its numpy path) opens."""
    meminfo = dict(line.split(":", 1) for line in pathlib.Path("/proc/meminfo").read_text().splitlines())
    ram_and_swap = sum(int(meminfo[key].split()[0]) * 1024 for key in ("MemTotal", "SwapTotal"))
    if pathlib.Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "2":
        pytest.skip("strict overcommit (vm.overcommit_memory=2) refuses any mapping past its commit limit")
    size = ram_and_swap * 5 // 4
    path = tmp_path / "sparse.safetensors"
    header = b'{"a":{"dtype":"U8","shape":[%d],"data_offsets":[0,%d]}}' % (size, size)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.write(b"\x07" * 16)
        try:
            f.truncate(8 + len(header) + size)  # sparse: no disk used
        except OSError as e:
            pytest.skip(f"this filesystem cannot hold a sparse file of {size} bytes: {e}")
    with tensafe.safe_open(path, "np") as f:
        assert f.get_slice("a")[5:10].tolist() == [7] * 5
    with tensafe.safe_open(path, "pt") as f:
        part = f.get_slice("a")[14:18]
        assert part.tolist() == [7, 7, 0, 0]
