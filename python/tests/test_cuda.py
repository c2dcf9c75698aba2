"""CUDA loads (`device="cuda:N"`): bit-exact against the reference for every
dtype, whole files, several files, slices and awkward sizes, with the pinned
staging memory inside its budget.

Skipped, with the reason shown, on machines without a CUDA device (CI has
none); `bench/gpu_bench.sh` runs this file on a GPU machine.
"""

import numpy as np
import pytest
import torch

import safetensors
import safetensors.torch as ref_pt
import tensafe
import tensafe.torch as ts_pt
from tensafe._pipeline import StagingStats, _plan_chunks, load_data_section
from tensafe._tensafe_rust import File, stage_data

import test_load
from conftest import evict, resident_fraction
from test_load import _chunk_count, assert_same

every_dtype_file = test_load.every_dtype_file  # the fixture, shared

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine: GPU loads are checked on a GPU machine (bench/gpu_bench.sh)"
)


def on_cpu(tensors):
    return {name: t.cpu() for name, t in tensors.items()}


def assert_same_on_device(ours, theirs):
    for name in theirs:
        assert ours[name].device == theirs[name].device, name
    assert_same(on_cpu(ours), on_cpu(theirs))


@pytest.mark.parametrize("backend", ["mmap", "pread"])
@pytest.mark.parametrize("device", ["cuda:0", "cuda", 0])
def test_load_file_matches_the_reference(every_dtype_file, backend, device):
    assert_same_on_device(ts_pt.load_file(every_dtype_file, device=device, backend=backend), ref_pt.load_file(every_dtype_file, device=device))


@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_safe_open_tensors_and_slices(every_dtype_file, backend):
    with tensafe.safe_open(every_dtype_file, "pt", device="cuda:0", backend=backend) as ours, safetensors.safe_open(
        every_dtype_file, "pt", device="cuda:0"
    ) as theirs:
        assert ours.keys() == theirs.keys()
        for name in theirs.keys():
            assert_same_on_device({name: ours.get_tensor(name)}, {name: theirs.get_tensor(name)})
            if len(theirs.get_slice(name).get_shape()) == 2 and "float4" not in name:
                a, b = ours.get_slice(name)[1:, 1:3], theirs.get_slice(name)[1:, 1:3]
                assert a.device == b.device and torch.equal(a.cpu(), b.cpu()), name


def test_bulk_tensors_are_views_of_one_device_allocation(every_dtype_file):
    with tensafe.safe_open(every_dtype_file, "pt", device="cuda:0") as f:
        loaded = f.get_tensors()
    bases = {t.untyped_storage().data_ptr() for t in loaded.values() if t.numel()}
    assert len(bases) == 1
    assert_same_on_device(loaded, ref_pt.load_file(every_dtype_file, device="cuda:0"))


def test_several_files_as_one_checkpoint(tmp_path):
    tensors = {f"layer.{i}.w": torch.randn(256, 64 + i) for i in range(12)}
    tensors.update({f"layer.{i}.b": torch.randn(7).to(torch.bfloat16) for i in range(12)})
    index = ts_pt.save_sharded(tensors, tmp_path, max_shard_size="200KB")
    assert index is not None and len(set(index["weight_map"].values())) > 2
    expected = {}
    for shard in sorted(tmp_path.glob("model-*.safetensors")):
        expected.update(ref_pt.load_file(shard, device="cuda:0"))
    for backend in ("mmap", "pread"):
        loaded = ts_pt.load_file(tmp_path, device="cuda:0", backend=backend)
        assert set(loaded) == set(expected)
        assert_same_on_device({k: loaded[k] for k in expected}, expected)


@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_awkward_sizes(tmp_path, backend):
    cases = {
        "only_empty": {"e": torch.zeros(0), "f": torch.zeros(0, 3, dtype=torch.bfloat16)},
        # Odd length spanning many staging chunks and progress steps.
        "one_huge": {"big": torch.randint(0, 255, (100 * 2**20 + 3,), dtype=torch.uint8)},
        "tiny_many": {f"t.{i}": torch.full((2,), float(i)) for i in range(50_000)},
        # A U8 tensor first leaves the F32 one at an odd offset (other writers do this).
        "unaligned": None,
    }
    for name, tensors in cases.items():
        path = tmp_path / f"{name}.safetensors"
        if tensors is None:
            header = b'{"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]},"b":{"dtype":"F32","shape":[2],"data_offsets":[3,11]}}'
            path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x01\x02\x03" + np.array([1.5, -2.0], "<f4").tobytes())
        else:
            ref_pt.save_file(tensors, path)
        ours = ts_pt.load_file(path, device="cuda:0", backend=backend)
        if tensors is None:
            assert ours["a"].tolist() == [1, 2, 3] and ours["b"].tolist() == [1.5, -2.0] and ours["b"].is_cuda
        else:
            assert_same_on_device(ours, ref_pt.load_file(path, device="cuda:0"))


@pytest.mark.parametrize("backend", ["mmap", "pread"])
@pytest.mark.parametrize("chunk,ring", [(4096, 1), (1 << 20, 3), (16 << 20, 16)])
@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("schedule", ["native", "ring"])
def test_pinned_staging_stays_within_its_budget(tmp_path, backend, chunk, ring, direct, schedule):
    from tensafe._tensafe_rust import DIRECT_ALIGN

    path = tmp_path / "budget.safetensors"
    ref_pt.save_file({"x": torch.arange(5 * 2**20 + 11, dtype=torch.int32), "y": torch.randn(3, 5)}, path)
    file = File(str(path), backend)
    if direct:
        evict(path)
    stats = StagingStats()
    seen = []
    before = torch.cuda.memory_allocated(0)
    data = load_data_section(file, "cuda:0", chunk_bytes=chunk, ring=ring, progress=lambda done, total: seen.append(done), stats=stats,
                             direct=direct, schedule=schedule)
    torch.cuda.synchronize()
    assert data.is_cuda and data.numel() == file.data_len
    assert torch.cuda.memory_allocated(0) - before <= file.data_len + (1 << 20), "one device allocation of the data section"
    assert stats.direct == direct and (stats.direct_bytes > 0) == direct
    assert 0 < stats.pinned_bytes <= ring * (chunk + (DIRECT_ALIGN if direct else 0))
    assert 1 <= stats.max_in_flight <= ring
    assert stats.chunks == _chunk_count(file, chunk, direct)
    assert seen == sorted(seen) and seen[-1] == file.data_len
    raw = path.read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    assert bytes(data.cpu().numpy()) == raw[start:]


def test_progress_and_cache_drop_on_cuda(page_cache_control, tmp_path):
    path = tmp_path / "progress.safetensors"
    big = torch.arange(12 * 2**20, dtype=torch.float32)  # 48 MiB: several staging chunks, less than a progress step
    ts_pt.save_file({"big": big}, path)
    seen = []
    path.read_bytes()  # in the page cache, so that the drop is seen
    loaded = ts_pt.load_file(path, device="cuda:0", backend="pread", progress=lambda done, total: seen.append((done, total)), drop_cache=True)
    assert resident_fraction(path) < 0.1
    assert torch.equal(loaded["big"].cpu(), big)
    assert seen == [(big.nbytes, big.nbytes)], "one report, once the copies have completed"


def test_tensor_parallel_load_on_cuda(tmp_path):
    path = tmp_path / "tp.safetensors"
    tensors = {"q.weight": torch.randn(64, 32), "o.weight": torch.randn(32, 64), "norm": torch.randn(32)}
    ts_pt.save_file(tensors, path)
    rules = [("*q.weight", 0), ("*o.weight", 1), ("*", None)]
    for rank in range(2):
        on_gpu = ts_pt.load_tensor_parallel(path, rank, 2, rules, device="cuda:0")
        on_host = ts_pt.load_tensor_parallel(path, rank, 2, rules)
        assert on_gpu.bytes_read == on_host.bytes_read
        assert all(t.is_cuda for t in on_gpu.tensors.values())
        assert_same(on_cpu(on_gpu.tensors), on_host.tensors)
    assert torch.equal(on_gpu.tensors["o.weight"].cpu(), tensors["o.weight"][:, 32:])


@pytest.mark.parametrize("backend", ["mmap", "pread"])
@pytest.mark.parametrize("chunk,ring,threads", [(4096, 1, 1), (1 << 20, 6, 3), (16 << 20, 16, 16)])
@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("schedule", ["readers", "native"])
def test_reader_schedules_on_cuda_are_exact(tmp_path, backend, chunk, ring, threads, direct, schedule):
    """Each reader copies what it read, on its own stream (in Python, or on
    Rust threads through the driver API: the default)."""
    path = tmp_path / "readers.safetensors"
    ref_pt.save_file({"x": torch.arange(5 * 2**20 + 11, dtype=torch.int32), "y": torch.randn(3, 5)}, path)
    file = File(str(path), backend)
    stats = StagingStats()
    data = load_data_section(file, "cuda:0", chunk_bytes=chunk, ring=ring, threads=threads, direct=direct, schedule=schedule, stats=stats)
    assert stats.chunks == _chunk_count(file, chunk, direct)
    torch.cuda.synchronize()
    assert bytes(data.cpu().numpy()) == path.read_bytes()[file.data_start :]


@pytest.mark.parametrize("schedule", ["ring", "readers", "native"])
def test_loads_follow_the_callers_device_and_stream(tmp_path, schedule):
    """A caller working on a side stream: the bytes land before the
    caller's next work (the device check only means something with several
    GPUs: an unindexed "cuda" is the current device)."""
    path = tmp_path / "stream.safetensors"
    ref_pt.save_file({"x": torch.arange(3 * 2**20 + 7, dtype=torch.int32)}, path)
    file = File(str(path), "pread")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        # Work still queued on the caller's stream when the load starts, in
        # memory the allocator then hands to the load: a load that did not
        # wait for it would have its bytes overwritten by the fill.
        junk = torch.empty(file.data_len, dtype=torch.uint8, device="cuda")
        torch.cuda._sleep(200_000_000)
        junk.fill_(0xFF)
        del junk
        data = load_data_section(file, "cuda", chunk_bytes=1 << 20, ring=3, schedule=schedule)
        following = data.clone()  # queued on the caller's (side) stream
    torch.cuda.synchronize()
    assert data.device == torch.device("cuda", torch.cuda.current_device())
    assert bytes(following.cpu().numpy()) == path.read_bytes()[file.data_start :]


def test_native_loads_refuse_a_device_target_that_does_not_fit(tmp_path):
    """The native schedule: a destination shorter than the data, or not device
    memory, is refused before any copy, and the device stays usable."""
    path = tmp_path / "fit.safetensors"
    ref_pt.save_file({"x": torch.arange(2**20, dtype=torch.int32)}, path)
    file = File(str(path), "pread")
    slots = [torch.empty(1 << 16, dtype=torch.uint8, pin_memory=True).numpy() for _ in range(2)]
    chunks = _plan_chunks(file.data_start, file.data_len, 1 << 16, False)
    stream = torch.cuda.current_stream().cuda_stream
    short = torch.empty(file.data_len // 2, dtype=torch.uint8, device="cuda:0")
    with pytest.raises(ValueError, match="outside the .*-byte destination"):
        stage_data(file, chunks, slots, 2, (0, short.data_ptr(), short.numel(), stream), direct=False)
    pinned = torch.empty(file.data_len, dtype=torch.uint8, pin_memory=True)
    with pytest.raises(RuntimeError, match="is not memory of CUDA device 0"):
        stage_data(file, chunks, slots, 2, (0, pinned.data_ptr(), pinned.numel(), stream), direct=False)
    torch.cuda.synchronize()
    data = load_data_section(file, "cuda:0", chunk_bytes=1 << 16, ring=2, schedule="native")
    assert bytes(data.cpu().numpy()) == path.read_bytes()[file.data_start :]
