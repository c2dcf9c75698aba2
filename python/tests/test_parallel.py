"""Tensor-parallel loads: each rank reads only its part."""

import json

import pytest
import torch

import tensafe.torch as ts_pt

RULES = [("*.q.weight", 0), ("*.o.weight", 1), ("*norm*", None), ("embed", 0)]


def bytes_read_by_process():
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"embed": torch.randn(1001, 64, generator=g)}
    for i in range(3):
        sd[f"l{i}.q.weight"] = torch.randn(256, 64, generator=g).to(torch.bfloat16)
        sd[f"l{i}.o.weight"] = torch.randn(64, 256, generator=g)
        sd[f"l{i}.norm.weight"] = torch.randn(64, generator=g)
    ts_pt.save_sharded(sd, tmp_path, max_shard_size="200KB")
    return sd


def test_four_ranks_tile_every_tensor_and_read_a_quarter(tmp_path):
    sd = checkpoint(tmp_path)
    parts = []
    for rank in range(4):
        before = bytes_read_by_process()
        loaded = ts_pt.load_tensor_parallel(tmp_path, rank, 4, RULES)
        from_storage = bytes_read_by_process() - before
        parts.append(loaded.tensors)
        replicated = sum(t.nbytes for n, t in sd.items() if "norm" in n)
        split = loaded.total_bytes - replicated
        # About a quarter of the split tensors (embed's 1001 rows do not divide by 4).
        assert abs(loaded.bytes_read - replicated - split / 4) <= 64 * 4, (rank, loaded.bytes_read)
        # What came from storage is that, plus the headers (each under 64 KiB)
        # and the gaps between the rows of the column parts (o: 64 rows of
        # 1 KiB, a quarter of each selected), which are read with them.
        gaps = 3 * 64 * (1024 - 256)
        assert loaded.bytes_read <= from_storage <= loaded.bytes_read + gaps + 8 * 65536, (from_storage, loaded.bytes_read)
    for name, full in sd.items():
        if "norm" in name:
            assert all(torch.equal(p[name], full) for p in parts)
        else:
            dim = 1 if ".o." in name else 0
            assert torch.equal(torch.cat([p[name] for p in parts], dim=dim), full), name
    # embed: 1001 rows → 251, 250, 250, 250.
    assert [p["embed"].shape[0] for p in parts] == [251, 250, 250, 250]


def test_same_parts_from_mmap_and_a_single_file(tmp_path):
    sd = checkpoint(tmp_path)
    single = tmp_path / "single.safetensors"
    ts_pt.save_file(sd, single)
    a = ts_pt.load_tensor_parallel(single, 2, 4, RULES, backend="mmap")
    b = ts_pt.load_tensor_parallel(tmp_path, 2, 4, RULES)
    assert a.bytes_read == b.bytes_read and a.total_bytes == b.total_bytes
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in sd)


@pytest.mark.parametrize(
    "rank,world_size,rules,message",
    [
        (-1, 2, [], "rank must be an integer >= 0, got -1"),
        (0, 0, [], "world_size must be an integer >= 1, got 0"),
        (0, 2, [("*", -1)], "the dim of rule '\\*' must be an integer >= 0, got -1"),
        (0, 2, [("*", True)], "the dim of rule '\\*' must be an integer >= 0, got True"),
        (2, 2, [], "rank"),
    ],
)
def test_bad_ranks_and_dims_are_value_errors_that_say_which(tmp_path, rank, world_size, rules, message):
    path = tmp_path / "m.safetensors"
    ts_pt.save_file({"w": torch.ones(4, 4)}, path)
    with pytest.raises(ValueError, match=message):
        ts_pt.load_tensor_parallel(path, rank, world_size, rules)


def test_numpy_integers_count_as_ranks_and_dims(tmp_path):
    import numpy as np

    path = tmp_path / "m.safetensors"
    ts_pt.save_file({"w": torch.arange(16.0).reshape(4, 4)}, path)
    part = ts_pt.load_tensor_parallel(path, np.int64(1), np.int32(2), [("*", np.int64(1))])
    assert torch.equal(part.tensors["w"], torch.arange(16.0).reshape(4, 4)[:, 2:])
    # Rules as a JSON config gives them: lists.
    part = ts_pt.load_tensor_parallel(path, 1, 2, json.loads('[["*", 1]]'))
    assert torch.equal(part.tensors["w"], torch.arange(16.0).reshape(4, 4)[:, 2:])


@pytest.mark.parametrize("backend", ["pread", "mmap"])
def test_every_dtype_split_along_every_dim_is_the_reference_slice(tmp_path, backend):
    """Each rank's part is bit-exact the reference's tensor sliced, for
    every dtype and split dim: row parts are one run each, column parts
    many, read alone when far apart in the file and together (one span,
    copied apart) when close."""
    import safetensors
    import safetensors.torch as ref_pt
    from tensafe._tensafe_rust import TensorParallelPlan

    from test_reference_diff import TORCH_DTYPES, as_bytes, random_tensor

    tensors, rules = {}, []
    for i, dtype in enumerate(TORCH_DTYPES):
        for dim in range(2 if dtype == torch.float4_e2m1fn_x2 else 3):  # F4: two values a byte in the last dim
            tensors[f"d{dim}.t{i}"] = random_tensor(dtype, (9, 70, 6), seed=3 * i + dim)
    tensors["near"] = random_tensor(torch.float32, (300, 5000), seed=100)  # column runs 5 KB, 15 KB apart
    tensors["far"] = random_tensor(torch.float32, (40, 20000), seed=101)  # column runs 20 KB, 60 KB apart
    tensors["none"] = random_tensor(torch.float32, (0, 4), seed=102)
    rules = [(f"d{dim}.*", dim) for dim in range(3)] + [("near", 1), ("far", 1), ("none", 0)]
    path = tmp_path / "dtypes.safetensors"
    ref_pt.save_file(tensors, path)
    with safetensors.safe_open(path, "pt") as ref:
        for rank in range(4):
            plan = TensorParallelPlan(rank, 4, rules)
            part = ts_pt.load_tensor_parallel(path, rank, 4, rules, backend=backend)
            assert sorted(part.tensors) == sorted(tensors)
            for name in tensors:
                dim, start, stop = plan.split(name, ref.get_slice(name).get_shape())
                # The reference's whole tensor, sliced by torch (its get_slice cannot slice F4).
                expected = ref.get_tensor(name)[(slice(None),) * dim + (slice(start, stop),)]
                got = part.tensors[name]
                assert (got.dtype, got.shape) == (expected.dtype, expected.shape), name
                assert torch.equal(as_bytes(got), as_bytes(expected)), (name, rank)
