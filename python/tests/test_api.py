"""The public API: names, argument handling, errors, lifecycle, concurrency, files."""

import io
import os
import pathlib
import pickle
import subprocess
import sys
import threading
import types

import numpy as np
import pytest
import torch

import safetensors
import safetensors.torch as ref_pt
import safetensors.numpy as ref_np
import tensafe
import tensafe.numpy as ts_np
import tensafe.torch as ts_pt


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "sample.safetensors"
    tensors = {"b": torch.arange(6, dtype=torch.int32).reshape(2, 3), "a": torch.ones(4), "c": torch.zeros(0)}
    ref_pt.save_file(tensors, path, metadata={"format": "pt"})
    return path, tensors


def test_public_names():
    for name in ["SafetensorError", "TensorSpec", "__version__", "deserialize", "safe_open", "_safe_open_handle", "serialize", "serialize_file"]:
        assert hasattr(tensafe, name), name
    for module in ("torch", "numpy"):
        mod = __import__(f"tensafe.{module}", fromlist=["_"])
        for fn in ("save", "save_file", "load", "load_file"):
            assert callable(getattr(mod, fn))
    for fn in ("save_model", "load_model", "storage_ptr", "storage_size", "_find_shared_tensors", "_remove_duplicate_names"):
        assert callable(getattr(ts_pt, fn))


def test_safetensor_error_is_an_importable_picklable_exception():
    assert issubclass(tensafe.SafetensorError, Exception)
    err = pickle.loads(pickle.dumps(tensafe.SafetensorError("boom")))
    assert isinstance(err, tensafe.SafetensorError) and err.args == ("boom",)


def test_keys_metadata_and_order(sample):
    path, _ = sample
    with tensafe.safe_open(path, "pt") as ours, safetensors.safe_open(path, "pt") as ref:
        assert ours.keys() == ref.keys() == ["a", "b", "c"]
        assert ours.offset_keys() == ref.offset_keys() == ["a", "c", "b"]
        assert ours.metadata() == ref.metadata() == {"format": "pt"}
        assert list(ours.get_tensors()) == ours.offset_keys()


def test_closed_handle(sample):
    path, _ = sample
    with tensafe.safe_open(path, "pt") as f:
        kept = f.get_tensor("b")
        s = f.get_slice("b")
    for call in (f.keys, f.offset_keys, f.metadata, f.get_tensors, lambda: f.get_tensor("a"), lambda: f.get_slice("a")):
        with pytest.raises(tensafe.SafetensorError, match="File is closed"):
            call()
    # What was handed out before closing still works.
    assert kept.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert s[1].tolist() == [3, 4, 5]


@pytest.mark.parametrize(
    "framework,device,message",
    [
        ("nope", "cpu", "framework nope is invalid"),
        ("pt", "gpu", "device gpu is invalid"),
        ("pt", "CPU", "device CPU is invalid"),
        ("pt", "cuda:0:1", "device cuda:0:1 is invalid"),
        ("pt", -1, "device -1 is invalid"),
        ("pt", 2**70, f"device {2**70} is invalid"),
        ("pt", "mps:1", "device mps:1 is invalid: only mps or mps:0 is supported"),
        ("pt", [0], "device [0] is invalid"),
        ("pt", 1.5, "device 1.5 is invalid"),
        ("pt", Ellipsis, "device Ellipsis is invalid"),
        ("np", "cuda:0", "Device cuda:0 is not supported for framework numpy"),
        ("np", "cuda", "Device cuda:0 is not supported for framework numpy"),
        ("flax", 0, "Device 0 is not supported for framework flax"),
    ],
)
def test_argument_errors_match_the_reference(sample, framework, device, message):
    path, _ = sample
    for mod in (tensafe, safetensors):
        with pytest.raises(mod.SafetensorError) as info:
            mod.safe_open(path, framework, device=device)
        assert str(info.value) == message, mod


def test_a_torch_device_is_taken_by_its_name(sample):
    """The reference refuses a `torch.device`; tensafe takes it as its name."""
    from tensafe._open import _device

    path, _ = sample
    with pytest.raises(safetensors.SafetensorError, match=r"device device\(type='cpu'\) is invalid"):
        safetensors.safe_open(path, "pt", device=torch.device("cpu"))
    with tensafe.safe_open(path, "pt", device=torch.device("cpu")) as f, tensafe.safe_open(path, "pt") as g:
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in g.keys())
    for device, same_as in [(torch.device("cpu"), "cpu"), (torch.device("cuda"), "cuda:0"), (torch.device("cuda", 3), "cuda:3")]:
        assert _device(device) == _device(same_as)
    with pytest.raises(tensafe.SafetensorError, match="device meta is invalid"):
        tensafe.safe_open(path, "pt", device=torch.device("meta"))


def test_backend_and_missing_tensor_errors(sample):
    path, _ = sample
    with pytest.raises(tensafe.SafetensorError, match='backend "foo" is invalid'):
        tensafe.safe_open(path, "pt", backend="foo")
    with tensafe.safe_open(path, "pt") as f:
        with pytest.raises(tensafe.SafetensorError, match="File does not contain tensor nope"):
            f.get_tensor("nope")
        with pytest.raises(tensafe.SafetensorError, match="File does not contain tensor nope"):
            f.get_slice("nope")


def test_missing_file_directory_and_bad_header(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such file or directory: .*notafile"):
        tensafe.safe_open(tmp_path / "notafile", "pt")
    # Reported before a device the framework cannot load to, as by the reference.
    for mod in (tensafe, safetensors):
        with pytest.raises(FileNotFoundError):
            mod.safe_open(tmp_path / "notafile", "np", device="cuda")
    # A directory is opened as a sharded checkpoint; this one holds none: not
    # found, an OSError as the reference's error for any directory is.
    with pytest.raises(FileNotFoundError, match="has neither model.safetensors.index.json nor model.safetensors"):
        tensafe.safe_open(tmp_path, "pt")
    with pytest.raises(OSError):
        safetensors.safe_open(tmp_path, "pt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(tensafe.SafetensorError, match="^Error while deserializing header: invalid header length"):
        tensafe.safe_open(bad, "pt")
    lfs = tmp_path / "lfs.safetensors"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 123\n")
    with pytest.raises(tensafe.SafetensorError, match="Git LFS pointer"):
        tensafe.safe_open(lfs, "pt")
    good = ts_pt.save({"w": torch.ones(100)})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good[:-10])
    with pytest.raises(tensafe.SafetensorError, match="expected .* bytes, found .*truncated"):
        tensafe.safe_open(cut, "pt")


def test_bytes_memoryview_and_file_objects_work_as_sources(sample):
    path, tensors = sample
    data = path.read_bytes()
    for source in (data, bytearray(data), memoryview(data), io.BytesIO(data), open(path, "rb")):
        with tensafe.safe_open(source, "pt") as f:
            assert torch.equal(f.get_tensor("b"), tensors["b"])
            assert f.get_slice("b")[:, 1].tolist() == [1, 4]
    with open(path, "r") as text_mode:
        with tensafe._safe_open_handle(text_mode, "np") as f:
            assert f.get_tensor("a").tolist() == [1.0] * 4


def test_safe_open_handle_of_something_else_raises_what_the_reference_raises(sample):
    path, _ = sample
    for not_a_file in (str(path), 3, None):
        with pytest.raises(AttributeError):
            safetensors._safe_open_handle(not_a_file, "pt")
        with pytest.raises(AttributeError, match="fileno"):
            tensafe._safe_open_handle(not_a_file, "pt")
        with pytest.raises(TypeError, match=type(not_a_file).__name__):
            tensafe._safe_open_handle(not_a_file, "pt")


def test_sources_are_read_by_bytes_whatever_their_item_size_or_shape(tmp_path):
    arrays = {"a": np.arange(4, dtype=np.float32), "z": np.zeros(1000, np.float32)}
    data = ts_np.save(arrays)
    assert len(data) % 4 == 0
    for source in (memoryview(bytearray(data)).cast("i"), memoryview(np.frombuffer(data, np.uint8).reshape(-1, 4)), memoryview(np.frombuffer(data, np.float32))):
        for framework in ("np", "pt"):
            with tensafe.safe_open(source, framework) as f:
                assert np.asarray(f.get_tensor("a")).tolist() == [0.0, 1.0, 2.0, 3.0], (source, framework)
                assert np.asarray(f.get_slice("a")[1:3]).tolist() == [1.0, 2.0]
    # Bytes that are not contiguous are refused, never read past or misread.
    strided = memoryview(data + data)[::2]
    for refused in (lambda: tensafe.deserialize(strided), lambda: tensafe.safe_open(strided, "np")):
        with pytest.raises(ValueError, match="must be contiguous"):
            refused()


def test_a_path_passed_as_bytes_is_named_in_the_error(sample):
    path, _ = sample
    for given in (os.fsencode(path), b"missing/model.safetensors"):
        with pytest.raises(tensafe.SafetensorError, match="the bytes given are the path .*: pass it as a str"):
            tensafe.safe_open(given, "pt")
    with pytest.raises(tensafe.SafetensorError) as info:
        tensafe.safe_open(b"\x05\x00\x00\x00\x00\x00\x00\x00{}", "pt")
    assert "path" not in str(info.value)


def test_file_objects_are_read_for_their_own_bytes(tmp_path, monkeypatch):
    import gzip
    import zipfile

    monkeypatch.chdir(tmp_path)
    ones, zeros = ({"w": np.full(2, v, np.float32)} for v in (1.0, 0.0))
    # A file of the member's name beside it must not be read in its place.
    ts_np.save_file(zeros, "model.safetensors")
    with zipfile.ZipFile("c.zip", "w") as z:
        z.writestr("model.safetensors", ts_np.save(ones))
    with zipfile.ZipFile("c.zip").open("model.safetensors") as member:
        with tensafe.safe_open(member, "np") as f:
            assert f.get_tensor("w").tolist() == [1.0, 1.0]
    with gzip.open("m.safetensors.gz", "wb") as g:
        g.write(ts_np.save(ones))
    with gzip.open("m.safetensors.gz", "rb") as g, tensafe.safe_open(g, "np") as f:
        assert f.get_tensor("w").tolist() == [1.0, 1.0]
    # A pipe is a stream: read, not mapped.
    read_end, write_end = os.pipe()
    os.write(write_end, ts_np.save(ones))
    os.close(write_end)
    with open(read_end, "rb") as pipe, tensafe.safe_open(pipe, "np") as f:
        assert f.get_tensor("w").tolist() == [1.0, 1.0]
    # Open for writing only, with the last bytes still in its buffer.
    with open("written.safetensors", "wb") as written:
        written.write(ts_np.save(ones))
        with tensafe.safe_open(written, "np") as f:
            assert f.get_tensor("w").tolist() == [1.0, 1.0]
    # Closed: the file its name names, by either entry point.
    for opened in (tensafe.safe_open(written, "np"), tensafe._safe_open_handle(written, "np")):
        with opened as f:
            assert f.get_tensor("w").tolist() == [1.0, 1.0]
    # An index opened through its handle is the checkpoint.
    ts_np.save_sharded({"a": np.zeros(600, np.float32), "b": np.ones(600, np.float32)}, "ckpt", max_shard_size="3KB")
    with open("ckpt/model.safetensors.index.json", "rb") as index, tensafe._safe_open_handle(index, "np") as f:
        assert f.keys() == ["a", "b"]
    # An OS file is the file it has open, even once its name is another's.
    with open("model.safetensors", "rb") as handle:
        ts_np.save_file(ones, "model.safetensors")  # replaced by rename
        for opened in (tensafe.safe_open(handle, "np"), tensafe._safe_open_handle(handle, "np")):
            with opened as f:
                assert f.get_tensor("w").tolist() == [0.0, 0.0]


@pytest.mark.filterwarnings("ignore:Truncating the start/stop/step")  # torch, in the reference
def test_slice_bounds_past_64_bits_clamp_and_indices_are_out_of_range(sample):
    path, tensors = sample
    a = tensors["a"]
    for backend in ("mmap", "pread"):
        with tensafe.safe_open(path, "pt", backend=backend) as f, safetensors.safe_open(path, "pt") as ref:
            s, r = f.get_slice("a"), ref.get_slice("a")
            for index in (slice(None, 2**64), slice(2**70, None), slice(-(2**70), None), slice(None, None, 2**64), slice(np.uint64(2**64 - 1), None)):
                assert s[index].tolist() == a.numpy()[index].tolist(), index
                if index.step is None:  # the reference selects nothing with a step past 2^63
                    assert s[index].tolist() == r[index].tolist(), index
            for index in (2**64, 2**63, np.uint64(2**64 - 1), -(2**70)):
                # Said with the value given, not a clamped one.
                with pytest.raises(IndexError, match=f"index {int(index)} at position 0 is out of bounds"):
                    s[index]
            with pytest.raises(IndexError, match="index 5 out of bounds for tensor dimension #0 of size 4"):
                s[5]


def test_special_files_are_refused_without_waiting(tmp_path):
    """A FIFO (whose open would wait for a writer forever) or a device is
    an error that says what it is, at once."""
    import threading

    fifo, fifo_index = tmp_path / "pipe.safetensors", tmp_path / "pipe.index.json"
    for path in (fifo, fifo_index):
        os.mkfifo(path)
    outcomes = []

    def attempt():
        for path, pattern in ((fifo, "is a FIFO, not a regular file"), (fifo_index, "is a FIFO, not a regular file"), ("/dev/zero", "is a character device")):
            with pytest.raises((OSError, tensafe.SafetensorError), match=pattern):
                tensafe.safe_open(path, "pt")
            outcomes.append(path)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive() and len(outcomes) == 3, outcomes


def test_a_checkpoint_index_without_tensors_has_no_metadata(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with tensafe.safe_open(tmp_path, "pt") as f:
        assert (f.keys(), f.metadata(), f.get_tensors()) == ([], None, {})


@pytest.mark.parametrize("framework", ["pt", "np"])
def test_argument_type_errors_read_as_the_references(tmp_path, framework):

    ours, ref, make = (ts_pt, ref_pt, torch.zeros) if framework == "pt" else (ts_np, ref_np, np.zeros)
    calls = {
        "a name that is not a str": lambda lib: lib.save({1: make(2)}),
        "metadata that is not a dict": lambda lib: lib.save({"a": make(2)}, metadata="x"),
        "a metadata value of None": lambda lib: lib.save({"a": make(2)}, metadata={"x": None}),
        "bytes that are a str": lambda lib: lib.load("x"),
        "no filename": lambda lib: lib.save_file({"a": make(2)}, None),
        "a filename that is an int": lambda lib: lib.save_file({"a": make(2)}, 3),
        "a filename that is bytes": lambda lib: lib.save_file({"a": make(2)}, b"x.safetensors"),
        "a missing directory": lambda lib: lib.save_file({"a": make(2)}, tmp_path / "missing" / "x.safetensors"),
    }
    path = tmp_path / "m.safetensors"
    ref.save_file({"a": make(2)}, path)
    calls.update({
        "a tensor name that is an int": lambda lib: lib.safe_open(path, framework).get_tensor(1),
        "a slice name that is None": lambda lib: lib.safe_open(path, framework).get_slice(None),
        "a framework that is None": lambda lib: lib.safe_open(path, None),
    })
    if framework == "np":
        calls["an unknown dtype"] = lambda lib: lib.save({"a": np.zeros(2, dtype=np.complex128)})
    for what, call in calls.items():
        raised = []
        for lib in (ref, ours):
            with pytest.raises(Exception) as info:
                call(lib)
            raised.append(info.value)
        theirs, mine = raised
        assert type(mine).__name__ == type(theirs).__name__, (what, theirs, mine)
        # The reference names its random temporary file; tensafe the directory.
        expected = str(theirs).split(" at path ")[0]
        assert str(mine).startswith(expected), (what, str(theirs), str(mine))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_save_errors_name_the_tensor():
    with pytest.raises(ValueError, match=r"Expected a dict of \[str, torch.Tensor\] but received <class 'str'>"):
        ts_pt.save("x")
    with pytest.raises(ValueError, match=r"Expected a dict of \[str, np.ndarray\] but received <class 'list'>"):
        ts_np.save([np.zeros(2)])  # the reference's numpy module: AttributeError
    # Any mapping saves, as with the reference's numpy module (it calls items()).
    proxy = types.MappingProxyType({"a": np.arange(3, dtype=np.float32)})
    assert ts_np.save(proxy) == ref_np.save(dict(proxy)) == ref_np.save(proxy)
    with pytest.raises(ValueError, match="Key `t` is invalid, expected torch.Tensor but received <class 'dict'>"):
        ts_pt.save({"t": {}})
    with pytest.raises(ValueError, match="non contiguous tensor: `nc`"):
        ts_pt.save({"nc": torch.zeros(3, 4).T})
    base = torch.zeros(10)
    with pytest.raises(RuntimeError, match="Some tensors share memory"):
        ts_pt.save({"x": base, "y": base[:5]})
    with pytest.raises(KeyError):
        ts_pt.save({"c": torch.zeros(2, dtype=torch.complex128)})

    for unstorable in (np.array(["text"]), np.zeros(2, dtype=np.complex128), np.array([None])):
        messages = []
        for lib, error in ((ts_np, tensafe.SafetensorError), (ref_np, safetensors.SafetensorError)):
            with pytest.raises(error) as info:
                lib.save({"s": unstorable})
            messages.append(str(info.value))
        # The same text, the list of dtypes aside (the same ones, in another order).
        (ours, our_list), (theirs, their_list) = (m.split("Supported dtypes: ") for m in messages)
        assert ours == theirs == f'Unknown dtype "{unstorable.dtype.name}". '
        assert set(our_list.split(", ")) == set(their_list.split(", "))
    with pytest.raises(tensafe.SafetensorError, match="reserved"):
        ts_np.save({"__metadata__": np.zeros(1)})
    with pytest.raises(TypeError, match="argument 'metadata': 'int' object is not an instance of 'str'"):
        ts_pt.save({"a": torch.zeros(1)}, metadata={"k": 1})


def test_shared_tensor_helpers_match_the_reference():
    x = torch.zeros(10)
    state = {"Y": torch.ones(3), "B": x[:5], "C": x[5:], "D": x[:3]}
    assert ts_pt._find_shared_tensors(state) == ref_pt._find_shared_tensors(state) == [{"Y"}, {"B", "D"}, {"C"}]
    full = {"a": x, "b": x, "c": torch.ones(2)}
    assert ts_pt._remove_duplicate_names(full) == ref_pt._remove_duplicate_names(full)
    assert ts_pt._remove_duplicate_names(full, preferred_names=["b"]) == ref_pt._remove_duplicate_names(full, preferred_names=["b"])
    assert ts_pt.storage_ptr(x) == ref_pt.storage_ptr(x) and ts_pt.storage_size(x) == ref_pt.storage_size(x)


def test_views_nested_in_a_tensor_are_one_group_of_shared_tensors(tmp_path):
    """README: a view inside a larger tensor but after a smaller view of it
    is shared with them (the reference puts it in a group of its own), so
    save_model stores the largest once, where the reference refuses."""
    class Nested(torch.nn.Module):
        def __init__(self):
            super().__init__()
            x = torch.arange(100, dtype=torch.float32)
            self.register_buffer("A", x)
            self.register_buffer("B", x[10:20])
            self.register_buffer("C", x[30:40])

    model = Nested()
    state = model.state_dict()
    assert ref_pt._find_shared_tensors(state) == [{"A", "B"}, {"C"}]
    assert ts_pt._find_shared_tensors(state) == [{"A", "B", "C"}]
    assert ts_pt._remove_duplicate_names(state) == {"A": ["B", "C"]}
    with pytest.raises(RuntimeError, match="no suitable name to keep"):
        ref_pt.save_model(model, tmp_path / "ref.safetensors")
    ts_pt.save_model(model, tmp_path / "ours.safetensors")
    assert set(ts_pt.load_file(tmp_path / "ours.safetensors")) == {"A"}
    loaded = Nested()
    for buffer in loaded.buffers():
        buffer.zero_()
    missing, unexpected = ts_pt.load_model(loaded, tmp_path / "ours.safetensors")
    assert not missing and not unexpected
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), state.values()))
    # Saving them all as they are is refused, naming the three together.
    with pytest.raises(RuntimeError, match="share memory") as info:
        ts_pt.save_file(state, tmp_path / "all.safetensors")
    assert "'A'" in str(info.value) and "'B'" in str(info.value) and "'C'" in str(info.value)


def test_save_model_and_load_model_round_trip_tied_weights(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 4)
            self.b.weight = self.a.weight

    model = Tied()
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    ts_pt.save_model(model, ours)
    ref_pt.save_model(model, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    fresh = Tied()
    missing, unexpected = ts_pt.load_model(fresh, ours)
    assert not missing and not unexpected
    assert torch.equal(fresh.b.weight, model.a.weight)
    # Nothing shared: no metadata block at all (transformers checks `metadata is not None`).
    plain = torch.nn.Linear(2, 2)
    ts_pt.save_model(plain, ours)
    ref_pt.save_model(plain, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    assert tensafe.safe_open(ours, "pt").metadata() is None


def test_new_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        ts_pt.save_file({"a": torch.zeros(1)}, tmp_path / "u.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "u.safetensors").stat().st_mode & 0o777 == 0o640


def test_mmap_tensors_are_lazy_private_and_outlive_the_handle(tmp_path):
    path = tmp_path / "w.safetensors"
    ts_pt.save_file({"w": torch.arange(4.0)}, path)
    with tensafe.safe_open(path, "pt") as f:
        t = f.get_tensor("w")
    t += 1  # copy-on-write: the file is untouched
    assert t.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert ts_pt.load_file(path)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_numpy_arrays_are_copies_as_the_reference_makes_them(tmp_path):
    """A numpy user does not expect an array that follows the file: written
    in place later, or cut short (SIGBUS on a mapped page past the end)."""
    path = tmp_path / "n.safetensors"
    ref_np.save_file({"m": np.zeros((2, 3), np.float32), "v": np.arange(1 << 16, dtype=np.int64)}, path)
    loaded = ts_np.load_file(path)
    with tensafe.safe_open(path, "np") as f:
        got = f.get_tensor("m")
        got[0, 0] = 42  # not seen by the handle's later reads, as in the reference
        assert f.get_tensor("m")[0, 0] == 0 and f.get_slice("m")[0:1][0, 0] == 0
        with safetensors.safe_open(path, "np") as theirs:
            mine = f.get_tensor("m")
            mine[1, 1] = 7
            assert np.array_equal(f.get_tensor("m"), theirs.get_tensor("m"))
    with open(path, "r+b") as out:  # cut short in place: the arrays keep their values
        out.truncate(8)
    assert loaded["m"].sum() == 0 and loaded["v"].sum() == (1 << 16) * ((1 << 16) - 1) // 2
    assert got[0, 0] == 42


def test_overwriting_a_mapped_file_keeps_old_tensors_intact(tmp_path):
    path = tmp_path / "m.safetensors"
    ts_pt.save_file({"w": torch.full((1024,), 7.0)}, path)
    old = ts_pt.load_file(path)["w"]
    ts_pt.save_file({"w": torch.full((1024,), 9.0)}, path)
    assert bool((old == 7.0).all())
    assert bool((ts_pt.load_file(path)["w"] == 9.0).all())


SLOW_SAVE = """
import sys
import numpy as np
import tensafe.numpy as ts_np
ts_np.save_file({f"t{i}": np.zeros(16 << 20, np.uint8) for i in range(64)}, sys.argv[1])
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux's /proc")
def test_a_save_killed_midway_leaves_the_old_file_and_nothing_else(tmp_path):
    """SIGTERM, which Python does not handle (and SIGKILL, or the OOM killer):
    no code of tensafe's runs, yet what it wrote had no name, and goes with
    the process instead of staying beside the file as a hidden 1 GiB."""
    import signal
    import time

    try:
        os.close(os.open(tmp_path, os.O_TMPFILE | os.O_RDWR))
    except OSError:
        pytest.skip(f"{tmp_path} has no O_TMPFILE: saves name their files from the start there")
    path = tmp_path / "model.safetensors"
    ts_pt.save_file({"w": torch.arange(4.0)}, path)
    old = path.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(path)])

    def unnamed_bytes_written():  # an O_TMPFILE file shows as `DIR/#INODE (deleted)`
        for fd in os.listdir(f"/proc/{child.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{child.pid}/fd/{fd}")
                if os.path.dirname(target) == str(tmp_path) and target.endswith(" (deleted)"):
                    return os.stat(f"/proc/{child.pid}/fd/{fd}").st_size
            except OSError:
                pass
        return 0

    deadline = time.time() + 60
    while unnamed_bytes_written() == 0:
        assert child.poll() is None, "the save ended before it could be killed"
        assert time.time() < deadline, "the save never started writing"
        time.sleep(0.001)
    child.send_signal(signal.SIGTERM)
    assert child.wait() == -signal.SIGTERM
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    assert path.read_bytes() == old


def test_many_threads_read_and_write_concurrently(tmp_path):
    tensors = {f"t{i}": torch.randn(64, 64) for i in range(16)}
    path = tmp_path / "shared.safetensors"
    ts_pt.save_file(tensors, path)
    errors = []

    def work(k):
        try:
            for _ in range(10):
                mine = tmp_path / f"out{k}.safetensors"
                ts_pt.save_file(tensors, mine)
                for backend in ("mmap", "pread"):
                    loaded = ts_pt.load_file(mine if k % 2 else path, backend=backend)
                    assert all(torch.equal(loaded[n], tensors[n]) for n in tensors)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_backend_auto_maps_local_files(sample):
    path, tensors = sample
    with tensafe.safe_open(path, "pt", backend="auto") as f:
        assert f._open().backend == "mmap"  # a local filesystem
        assert torch.equal(f.get_tensor("b"), tensors["b"])


def test_type_stubs_cover_the_compiled_module():
    import ast
    import pathlib

    from tensafe import _tensafe_rust

    stub = pathlib.Path(tensafe.__file__).with_name("_tensafe_rust.pyi")
    names = {n.name for n in ast.parse(stub.read_text()).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    names |= {t.id for n in ast.parse(stub.read_text()).body if isinstance(n, ast.AnnAssign) for t in [n.target]}
    public = {n for n in dir(_tensafe_rust) if not n.startswith("__") or n == "__version__"}
    assert public - names == set(), public - names
    # And the other way: a member the stub names but the module lacks lets
    # type checkers pass code that fails with AttributeError.
    missing = []
    for node in ast.parse(stub.read_text()).body:
        if isinstance(node, ast.ClassDef):
            cls = getattr(_tensafe_rust, node.name, None)
            missing += [f"{node.name}.{item.name}" for item in node.body if isinstance(item, ast.FunctionDef) and not hasattr(cls, item.name)]
    assert not missing, missing


def test_serialize_file_matches_the_reference(tmp_path):
    data = np.arange(6, dtype=np.int16)
    spec = dict(dtype="int16", shape=[2, 3], data_ptr=data.ctypes.data, data_len=data.nbytes)
    tensafe.serialize_file({"x": tensafe.TensorSpec(**spec)}, tmp_path / "a.safetensors", {"m": "1"})
    safetensors.serialize_file({"x": safetensors.TensorSpec(**spec)}, tmp_path / "b.safetensors", {"m": "1"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with pytest.raises(tensafe.SafetensorError, match="^Error while serializing: .*no-such-dir"):
        tensafe.serialize_file({"x": tensafe.TensorSpec(**spec)}, tmp_path / "no-such-dir" / "c.safetensors")


def test_f6_tensors_are_listed_but_not_converted(tmp_path):
    header = b'{"f6":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[0,3]}}'
    path = tmp_path / "f6.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x01\x02\x03")
    for framework in ("pt", "np"):
        with tensafe.safe_open(path, framework) as f:
            assert f.keys() == ["f6"] and f.get_slice("f6").get_dtype() == "F6_E2M3"
            with pytest.raises(tensafe.SafetensorError, match="Dtype not understood: F6_E2M3"):
                f.get_tensor("f6")


def test_the_gil_is_released_while_saving(tmp_path):
    """A pure-Python thread keeps running while a large save is in progress."""
    big = {"w": torch.ones(128 * 1024 * 1024, dtype=torch.uint8)}
    ticks = []
    done = threading.Event()

    def ticker():
        while not done.is_set():
            ticks.append(1)

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        before = len(ticks)
        ts_pt.save_file(big, tmp_path / "big.safetensors")
        during = len(ticks) - before
    finally:
        done.set()
        thread.join()
    # With the GIL held for the whole write the ticker would barely move.
    assert during > 1000, during


def test_modules_have_every_name_of_the_references():
    """Code reaches into the reference's modules (`safetensors.torch._flatten_as_ptr`,
    `safetensors.numpy._TYPES`, `safetensors.torch.serialize`, …): every name
    they define or import is there, apart from stdlib modules and typing."""
    import types


    for ours, theirs in ((ts_pt, ref_pt), (ts_np, ref_np), (tensafe, safetensors)):
        names = {
            n for n, v in vars(theirs).items()
            if not n.startswith("__") and not isinstance(v, types.ModuleType) and getattr(v, "__module__", None) != "typing"
        }
        assert not names - set(dir(ours)), theirs.__name__
    # The raw-pointer save helpers give the same bytes as the reference's.
    tensors = {"w": torch.arange(4.0), "h": torch.ones(2, dtype=torch.bfloat16)}
    assert tensafe.serialize(ts_pt._flatten_as_ptr(tensors, [])) == safetensors.serialize(ref_pt._flatten_as_ptr(tensors, []))
    arrays = {"x": np.arange(6, dtype=">i4").reshape(2, 3)}
    assert tensafe.serialize(ts_np._flatten(arrays, [])) == ref_np.save(arrays)


def _drop_in_output(script, cwd):
    """The lines `script` prints, run with `python -m tensafe.drop_in` from `cwd`."""

    out = subprocess.run([sys.executable, "-m", "tensafe.drop_in", str(script)], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.splitlines()


def test_drop_in_serves_the_compiled_module_names(tmp_path):
    script = tmp_path / "uses_rust_module.py"
    script.write_text(
        "from safetensors._safetensors_rust import safe_open, SafetensorError, serialize\n"
        "from safetensors import _safetensors_rust\n"
        "import importlib.metadata, importlib.util, safetensors.torch, torch\n"
        "safetensors.torch.save_file({'a': torch.ones(2)}, 'a.safetensors')\n"
        "with safe_open('a.safetensors', 'pt') as f: print(type(f).__module__, f.keys())\n"
        "assert _safetensors_rust.SafetensorError is safetensors.SafetensorError is SafetensorError\n"
        "assert importlib.util.find_spec('safetensors._safetensors_rust').name == 'safetensors._safetensors_rust'\n"
        "assert importlib.util.find_spec('safetensors').submodule_search_locations is not None\n"
        "print(safetensors.__version__, _safetensors_rust.__version__, importlib.metadata.version('safetensors'))\n"
        "print(importlib.metadata.metadata('safetensors')['Summary'])\n"
    )
    # Version checks see the reference's version, from the drop-in's own
    # distribution (so they pass where the reference is not installed).
    assert _drop_in_output(script, tmp_path) == [
        "tensafe._open ['a']",
        f"{safetensors.__version__} {safetensors.__version__} {safetensors.__version__}",
        "tensafe, standing in for safetensors (tensafe.drop_in)",
    ]


def test_drop_in_runs_code_given_with_c_as_python_does(tmp_path):
    code = "import sys, safetensors; print(safetensors.__file__.count('tensafe') > 0, sys.argv, __name__)"
    out = subprocess.run([sys.executable, "-m", "tensafe.drop_in", "-c", code, "a", "b"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0 and out.stdout.split("\n")[0] == "True ['-c', 'a', 'b'] __main__", out.stdout + out.stderr
    out = subprocess.run([sys.executable, "-m", "tensafe.drop_in", "-c"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "-c needs an argument" in out.stderr, out.stderr


def test_drop_in_install_replaces_a_reference_imported_before():

    code = (
        "import safetensors.torch, tensafe.drop_in\n"
        "tensafe.drop_in.install()\n"
        "import safetensors, safetensors.torch\n"
        "print(safetensors.safe_open.__module__, safetensors.torch.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["tensafe._open", "tensafe.torch"]


def test_drop_in_runs_a_script_as_python_does_and_reaches_its_child_processes(tmp_path):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "beside.py").write_text("VALUE = 'found beside the script'\n")
    other = tmp_path / "other_environment"
    (other / "safetensors").mkdir(parents=True)
    (other / "safetensors" / "__init__.py").write_text("MARK = 'the safetensors of another environment'\n")
    script = tmp_path / "project" / "train.py"
    script.write_text(
        "import multiprocessing, os, subprocess, sys\n"
        "import beside\n"
        "def where(_):\n"
        "    import safetensors\n"
        "    return safetensors.safe_open.__module__\n"
        "if __name__ == '__main__':\n"
        "    print(beside.VALUE)\n"
        "    print(where(0))\n"
        "    with multiprocessing.get_context('spawn').Pool(1) as pool: print(pool.map(where, [0])[0])\n"
        "    child = 'import safetensors.torch; print(safetensors.torch.save_file.__module__, safetensors.__version__)'\n"
        "    print(subprocess.run([sys.executable, '-c', child], capture_output=True, text=True, check=True).stdout.strip())\n"
        "    # A Python without tensafe (-S: no site-packages) gets its own safetensors.\n"
        f"    env = dict(os.environ, PYTHONPATH=os.environ['PYTHONPATH'] + os.pathsep + {str(other)!r})\n"
        "    child = 'import safetensors; print(safetensors.MARK)'\n"
        "    print(subprocess.run([sys.executable, '-S', '-c', child], env=env, capture_output=True, text=True, check=True).stdout.strip())\n"
    )
    # Run from elsewhere: the script's own directory must come first on sys.path.
    assert _drop_in_output(script, tmp_path) == [
        "found beside the script",
        "tensafe._open",
        "tensafe._open",
        f"tensafe.torch {safetensors.__version__}",
        "the safetensors of another environment",
    ]


def test_lazy_conjugate_and_negative_views_save_their_values():
    # The reference writes the memory of such views, i.e. the wrong values.
    c = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)
    loaded = ts_pt.load(ts_pt.save({"conj": c.conj(), "neg": torch.arange(3.0)._neg_view()}))
    assert loaded["conj"].tolist() == [1 - 2j, 3 + 1j] and loaded["neg"].tolist() == [0.0, -1.0, -2.0]


def test_contiguous_tensors_with_an_odd_stride_on_a_size_one_dimension_save_like_the_reference(tmp_path):
    # torch calls these contiguous; reshape(-1) keeps their stride, which a byte view refuses.
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    cases = {
        "column": x[:1, 2],
        "transposed": x.t()[1:2, :1],
        "real": torch.tensor([1 + 2j], dtype=torch.complex64).real,
        "empty": torch.zeros(0, 4)[:, 0],
        "half_clone": x[:1, 2].clone().half(),
    }
    assert all(t.is_contiguous() and t.stride()[-1] != 1 for t in cases.values())
    assert ts_pt.save(cases) == ref_pt.save(cases)
    ts_pt.save_file(cases, tmp_path / "t.safetensors")
    ref_pt.save_file(cases, tmp_path / "r.safetensors")
    assert (tmp_path / "t.safetensors").read_bytes() == (tmp_path / "r.safetensors").read_bytes()
    keep_alive, keep_alive_ref = [], []
    ours = tensafe.serialize(ts_pt._flatten_as_ptr(cases, keep_alive), metadata=None)
    assert ours == safetensors.serialize(ref_pt._flatten_as_ptr(cases, keep_alive_ref), metadata=None)


def test_a_name_with_a_lone_surrogate_is_a_unicode_error_like_the_reference(tmp_path):
    for ref, ours, tensor in ((ref_pt, ts_pt, torch.ones(1)), (ref_np, ts_np, np.ones(1, np.float32))):
        for lib in (ref, ours):
            with pytest.raises(UnicodeEncodeError):
                lib.save({"\udcff": tensor})
            with pytest.raises(UnicodeEncodeError):
                lib.save_file({"\udcff": tensor}, tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors").exists()
    for lib, flatten in ((safetensors, ref_pt._flatten_as_ptr), (tensafe, ts_pt._flatten_as_ptr)):
        with pytest.raises(UnicodeEncodeError):
            lib.serialize(flatten({"\udcff": torch.ones(1)}, []), metadata=None)


def test_metadata_with_a_lone_surrogate_is_a_unicode_error_like_the_reference():
    for lib in (ref_pt, ts_pt):
        with pytest.raises(UnicodeEncodeError):
            lib.save({"a": torch.ones(1)}, metadata={"k": "\udc80"})
        # A non-text entry before it is the TypeError the reference reports first.
        with pytest.raises(TypeError):
            lib.save({"a": torch.ones(1)}, metadata={"a": 1, "b": "\udc80"})
    # Also through the compiled serializer directly, as the drop-in serves it.
    for lib, flatten in ((safetensors, ref_pt._flatten_as_ptr), (tensafe, ts_pt._flatten_as_ptr)):
        with pytest.raises(UnicodeEncodeError):
            lib.serialize(flatten({"a": torch.ones(1)}, []), metadata={"k": "\udc80"})



def test_remove_duplicate_names_lets_a_lone_partial_tensor_through():
    """README: tensafe lets a tensor that shares its storage with no other one
    through even if it does not cover the storage; the reference refuses it
    (what is saved is the same)."""
    lone = {"a": torch.zeros(10)[:5]}
    with pytest.raises(RuntimeError, match="None is covering the entire storage"):
        ref_pt._remove_duplicate_names(lone)
    assert ts_pt._remove_duplicate_names(lone) == {}


def test_saving_a_value_that_is_not_an_array_names_its_key_escaped():

    values = {"fine": np.zeros(2, np.float32), "layer.0\n": [1.0, 2.0]}
    with pytest.raises(AttributeError):
        ref_np.save(values)  # the reference fails on the value, without the key
    with pytest.raises(tensafe.SafetensorError, match=r"Key `layer\.0\\n` is invalid, expected numpy\.ndarray but received <class 'list'>"):
        ts_np.save(values)
    # The reference's torch message has the key raw (a newline, here).
    with pytest.raises(ValueError, match=r"Key `layer\.0\\n` is invalid, expected torch\.Tensor"):
        ts_pt.save({"layer.0\n": [1.0, 2.0]})



def test_names_that_are_not_utf8_are_local_paths_and_urls_follow_one_rule(tmp_path):
    name = os.path.join(os.fsencode(tmp_path), b"bad\xff.safetensors")
    ref_np.save_file({"a": np.arange(3, dtype=np.float32)}, os.fsdecode(name))
    for path in (os.fsdecode(name), pathlib.Path(os.fsdecode(name))):
        assert ts_np.load_file(path)["a"].tolist() == [0.0, 1.0, 2.0]
        with tensafe.safe_open(path, "np") as f:
            assert f.keys() == ["a"]
    # The Rust rule for URLs, in any case, for opens, saves and checkpoints alike.
    from tensafe._open import _is_checkpoint
    from tensafe._tensafe_rust import File

    assert File.is_remote("HTTP://127.0.0.1/x.safetensors") and File.is_remote("adl://c/x/") and File.is_remote("s3a://b/k")
    assert not File.is_remote("http:/x") and not File.is_remote(str(tmp_path)) and not File.is_remote(os.fsdecode(name))
    assert _is_checkpoint("Https://host/ckpt/") and _is_checkpoint("azure://c/ckpt/model.safetensors.index.json")


def test_a_signal_handler_stops_a_save_midway_and_the_old_file_stays(tmp_path):
    """Ctrl-C (here an alarm whose handler raises) stops a long save_file
    between two 64 MiB writes: its exception comes out, the file saved to is
    still the old one and no temporary file is left. (The reference raises it
    only once the new file is in place.)"""
    import time

    from conftest import seconds_until_a_signal_stops, stops_early

    path = tmp_path / "model.safetensors"
    ts_np.save_file({"old": np.arange(3, dtype=np.int64)}, path)
    old = path.read_bytes()
    big = {"x": np.resize(np.arange(251, dtype=np.uint8), 1 << 30)}

    def save():
        start = time.perf_counter()
        ts_np.save_file(big, path)
        return time.perf_counter() - start

    full = save()
    ts_np.save_file({"old": np.arange(3, dtype=np.int64)}, path)
    if full < 0.4:
        pytest.skip(f"a 1 GiB save takes {full:.2f} s here: too short to stop midway")
    stopped = stops_early(lambda: seconds_until_a_signal_stops(save, after=0.05), full)
    assert stopped < full / 2, f"stopped after {stopped:.2f} s of a {full:.2f} s save"
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["model.safetensors"]
