"""Differential tests: tensafe against the reference, byte for byte and value for value."""

import os
import pathlib
import re

import numpy as np
import pytest
import torch

import safetensors
import safetensors.numpy as ref_np
import safetensors.torch as ref_pt
import tensafe
import tensafe.numpy as ts_np
import tensafe.torch as ts_pt

TORCH_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32,
    torch.int64, torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz, torch.float8_e8m0fnu, torch.float4_e2m1fn_x2,
]
SHAPES = [(), (0,), (3,), (2, 3), (2, 0, 4), (1, 2, 3, 2)]


def random_tensor(dtype, shape, seed):
    """Random bytes reinterpreted as `dtype` (every bit pattern, NaNs included)."""
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape)) if shape else 1
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def as_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_torch_bytes_identical_for_every_dtype(dtype, tmp_path):
    # A scalar F4 is half a byte: neither implementation can write it.
    shapes = [s for s in SHAPES if s or dtype != torch.float4_e2m1fn_x2]
    tensors = {f"t{i}": random_tensor(dtype, s, i) for i, s in enumerate(shapes)}
    tensors["other.f32"] = random_tensor(torch.float32, (5,), 99)
    meta = {"format": "pt"}
    expected = ref_pt.save(tensors, metadata=meta)
    assert ts_pt.save(tensors, metadata=meta) == expected
    ts_pt.save_file(tensors, tmp_path / "a.safetensors", metadata=meta)
    assert (tmp_path / "a.safetensors").read_bytes() == expected

    # And it reads back what the reference reads, on both backends. (The
    # reference's own `load(bytes)` lacks F8_E8M0 and F4, so read its file.)
    reference = ref_pt.load_file(tmp_path / "a.safetensors")
    for backend in ("mmap", "pread"):
        ours = ts_pt.load_file(tmp_path / "a.safetensors", backend=backend)
        assert list(ours) == [k for k in safetensors.safe_open(tmp_path / "a.safetensors", "pt").offset_keys()]
        for name, tensor in ours.items():
            assert tensor.dtype == reference[name].dtype and tensor.shape == reference[name].shape, name
            assert torch.equal(as_bytes(tensor), as_bytes(reference[name])), name
    loaded = ts_pt.load(expected)
    for name, tensor in loaded.items():
        assert torch.equal(as_bytes(tensor), as_bytes(reference[name])), name


NUMPY_DTYPES = ["bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                "float16", "float32", "float64", "complex64", "bfloat16", "float8_e4m3fn", "float8_e5m2"]


@pytest.mark.parametrize("name", NUMPY_DTYPES)
def test_numpy_bytes_identical(name, tmp_path):
    import ml_dtypes  # noqa: F401  (registers bfloat16/float8 for the reference too)

    dtype = np.dtype(getattr(ml_dtypes, name, None) or name)
    rng = np.random.default_rng(0)
    arrays = {f"a{i}": rng.integers(0, 256, size=int(np.prod(s)) * dtype.itemsize, dtype=np.uint8).view(dtype).reshape(s)
              for i, s in enumerate(SHAPES)}
    if name == "bool":
        arrays = {k: np.asarray(v.view(np.uint8) % 2 == 1) for k, v in arrays.items()}
    expected = ref_np.save(arrays)
    assert ts_np.save(arrays) == expected
    with tensafe.safe_open(_write(tmp_path, expected), "np") as f:
        for key in f.keys():
            got = f.get_tensor(key)
            assert got.dtype == arrays[key].dtype and got.shape == arrays[key].shape
            assert got.tobytes() == arrays[key].tobytes()
    for key, value in ts_np.load(expected).items():
        assert value.tobytes() == arrays[key].tobytes()


def _write(tmp_path, data):
    path = tmp_path / "f.safetensors"
    path.write_bytes(data)
    return path


def test_numpy_non_contiguous_is_saved_by_value():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    views = {"t": a.T, "strided": a[:, ::2]}
    loaded = ts_np.load(ts_np.save(views))
    np.testing.assert_array_equal(loaded["t"], a.T)
    np.testing.assert_array_equal(loaded["strided"], a[:, ::2])
    # The reference writes the raw memory of the base array instead.
    wrong = ref_np.load(ref_np.save(views))
    assert not np.array_equal(wrong["t"], a.T)


def test_big_endian_numpy_arrays_are_stored_little_endian():
    a = np.arange(6, dtype=">i4")
    assert ts_np.save({"a": a}) == ref_np.save({"a": a.astype("<i4")})


def test_metadata_order_is_sorted_and_deterministic():
    meta = {"z": "1", "a": "2", "m": "3"}
    first = ts_pt.save({"x": torch.zeros(1)}, metadata=meta)
    assert first == ts_pt.save({"x": torch.zeros(1)}, metadata=dict(reversed(meta.items())))
    assert b'{"__metadata__":{"a":"2","m":"3","z":"1"}' in first
    assert safetensors.safe_open(_write_tmp(first), "pt").metadata() == meta


def _write_tmp(data, _n=[0]):
    import tempfile
    _n[0] += 1
    path = tempfile.mktemp(suffix=".safetensors")
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_serialize_and_tensorspec_match_the_reference():
    data = np.arange(8, dtype=np.float32)
    for mod in (safetensors, tensafe):
        spec = mod.TensorSpec(dtype="float32", shape=[2, 4], data_ptr=data.ctypes.data, data_len=data.nbytes)
        assert spec.dtype == "F32" and spec.shape == [2, 4]
    ours = tensafe.serialize({"w": tensafe.TensorSpec(dtype="float32", shape=[2, 4], data_ptr=data.ctypes.data, data_len=32)}, {"k": "v"})
    theirs = safetensors.serialize({"w": safetensors.TensorSpec(dtype="float32", shape=[2, 4], data_ptr=data.ctypes.data, data_len=32)}, {"k": "v"})
    assert ours == theirs
    f4 = tensafe.TensorSpec(dtype="float4_e2m1fn_x2", shape=[3], data_ptr=data.ctypes.data, data_len=3)
    assert f4.shape == [6]
    messages = []
    for mod in (safetensors, tensafe):
        with pytest.raises(mod.SafetensorError) as raised:
            mod.TensorSpec(dtype="nope", shape=[1], data_ptr=0, data_len=0)
        messages.append(str(raised.value))
    assert messages[1] == messages[0], "the reference's list of dtypes, in its order"
    assert messages[1].startswith('Unknown dtype "nope". Supported dtypes: bool, int8')
    with pytest.raises(TypeError):
        tensafe.TensorSpec("float32", [1], 0, 0)
    with pytest.raises(TypeError, match="not an instance of 'TensorSpec'"):
        tensafe.serialize({"w": {"dtype": "float32"}})


def test_deserialize_matches_the_reference():
    blob = ref_pt.save({"b": torch.arange(3, dtype=torch.int16), "a": torch.ones(2, 2)})
    ours = tensafe.deserialize(blob)
    theirs = dict(safetensors.deserialize(blob))
    assert [n for n, _ in ours] == ["a", "b"]  # file order
    for name, entry in ours:
        assert list(entry) == ["shape", "dtype", "data"]
        assert entry == theirs[name]


# -- slicing ---------------------------------------------------------------

SLICES = [
    (slice(None),), (slice(2),), (slice(None), slice(2)), (0, slice(2)), (slice(2, None), 0),
    (slice(2, None), -1), (slice(1, 6, 2), slice(1, 5, 3)), (0, 0), Ellipsis, (Ellipsis, 2),
    (slice(-3, None),), (slice(None, 20),), (slice(3, 1),), (slice(10, 10),), (None, 1, None),
    (slice(-100, 100, 4),), -1, (),
]


@pytest.mark.parametrize("index", SLICES, ids=repr)
@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_slices_follow_numpy_on_every_framework(index, backend, tmp_path):
    a = np.arange(50, dtype=np.float32).reshape(10, 5)
    path = tmp_path / "s.safetensors"
    ts_np.save_file({"a": a}, path)
    with tensafe.safe_open(path, "np", backend=backend) as f:
        s = f.get_slice("a")
        assert s.get_shape() == [10, 5] and s.get_dtype() == "F32"
        np.testing.assert_array_equal(s[index], a[index])
    with tensafe.safe_open(path, "pt", backend=backend) as f:
        got = f.get_slice("a")[index]
        assert torch.equal(got, torch.from_numpy(a)[index])


@pytest.mark.parametrize(
    "index,message",
    [
        ((slice(2, None), -6), "Invalid index -6 for dimension 1 of size 5"),
        ((slice(2, None), 20), "Error during slicing [2:, 20] with shape [10, 5]: index 20 out of bounds for tensor dimension #1 of size 5"),
        ((Ellipsis, 20), "Error during slicing [:, 20] with shape [10, 5]: index 20 out of bounds for tensor dimension #1 of size 5"),
        ((0, 0, 0), "Error during slicing [0, 0, 0] with shape [10, 5]: more slicing indexes than dimensions in tensor"),
        ([1], "Non empty lists are not implemented"),
    ],
    ids=repr,
)
def test_slice_error_texts_match_the_reference(tmp_path, index, message):
    path = tmp_path / "s.safetensors"
    ts_np.save_file({"a": np.zeros((10, 5), np.float32)}, path)
    for lib in (tensafe, safetensors):
        with lib.safe_open(path, "np") as f:
            with pytest.raises(lib.SafetensorError) as info:
                f.get_slice("a")[index]
            assert str(info.value) == message, lib
    with tensafe.safe_open(path, "np") as f:
        assert f.get_slice("a")[[]].shape == (0, 5)


TORCH_INDICES = [
    [0, 2], ([2, 0], 1), ([0, 1], [1, 2]), (1, slice(None), [0, 1]), [True, False, True],
    np.array([0, 2]), torch.tensor([0, 2]), torch.tensor([True, False, True]), (slice(None), [0, 3], slice(1, 3)),
    (slice(1, 3), Ellipsis, [1, 4]), np.array([[True, False, True, False]] * 3), True, (False, 0), [-1],
    (Ellipsis, 1, Ellipsis), torch.tensor(1), (np.int64(-1), torch.tensor([0])), np.bool_(True),
    torch.tensor(1, dtype=torch.uint8), (slice(None), torch.tensor([1, 0, 1, 0], dtype=torch.uint8)),
    np.array(1, dtype=np.uint8), np.array(0, dtype=np.uint8), (0, np.array(1, dtype=np.uint8)), np.uint8(2),
]


@pytest.mark.parametrize("index", TORCH_INDICES, ids=repr)
@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_torch_slices_take_every_index_torch_takes_like_the_reference(tmp_path, index, backend):
    """The reference's default torch path indexes the whole tensor with torch:
    index lists, arrays, tensors and masks work there, so they work here
    (on both backends), with the same values and shapes."""
    path = tmp_path / "s.safetensors"
    original = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    ref_pt.save_file({"a": original}, path)
    with safetensors.safe_open(path, "pt") as f:
        try:
            expected = f.get_slice("a")[index]
        except IndexError:  # torch refuses some (numpy booleans): so must we
            with tensafe.safe_open(path, "pt", backend=backend) as ours, pytest.raises(IndexError):
                ours.get_slice("a")[index]
            return
        # Basic indices give views of the mapping: a write into one is seen
        # by the handle's later reads (never by the file).
        expected.fill_(-1)
        expected_after = f.get_tensor("a")
    with tensafe.safe_open(path, "pt", backend=backend) as f:
        got = f.get_slice("a")[index]
        assert got.shape == expected.shape and torch.equal(got, expected.new_full(expected.shape, 0) + original[index])
        got.fill_(-1)
        # As the reference's with a mapping; private memory with pread.
        assert torch.equal(f.get_tensor("a"), expected_after if backend == "mmap" else original)
    assert torch.equal(ts_pt.load_file(path)["a"], original)


def test_a_whole_slice_of_a_mapped_file_is_a_view_of_its_tensor_as_the_reference_makes_it(tmp_path):
    """transformers loads every weight as `get_slice(name)[...]`: with the
    reference that is a view of the mapping, no copy; so it is here."""
    path = tmp_path / "v.safetensors"
    ref_pt.save_file({"w": torch.arange(2 << 20, dtype=torch.float32).reshape(1024, -1), "b": torch.ones(3)}, path)
    for lib in (safetensors, tensafe):
        with lib.safe_open(path, "pt") as f:
            for name in ("w", "b"):
                whole, rows, tensor = f.get_slice(name)[...], f.get_slice(name)[1:], f.get_tensor(name)
                assert whole.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr(), (lib.__name__, name)
                assert rows.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr(), (lib.__name__, name)
                assert torch.equal(whole, tensor) and torch.equal(rows, tensor[1:])
    with tensafe.safe_open(path, "pt", backend="pread") as f:  # private memory: a copy of the selected bytes
        assert f.get_slice("w")[...].untyped_storage().data_ptr() != f.get_tensor("w").untyped_storage().data_ptr()
    # Bytes the caller handed over are never written through a slice (a list
    # of slices is basic indexing to torch, not to the native reader).
    given = bytearray(path.read_bytes())
    with tensafe.safe_open(given, "pt") as f:
        f.get_slice("b")[[slice(None)]].fill_(-7)
    assert given == path.read_bytes()
    # A step past every dimension selects one element, without overflowing
    # torch's strides (an empty tensor too).
    ref_pt.save_file({"e": torch.zeros(0, 3), "v": torch.arange(6.0)}, path)
    with tensafe.safe_open(path, "pt") as f, safetensors.safe_open(path, "pt") as theirs:
        assert f.get_slice("e")[:: 2**63].shape == (0, 3) and f.get_slice("v")[1::2**70].tolist() == [1.0]
        assert f.get_slice("v")[1:5:7].tolist() == theirs.get_slice("v")[1:5:7].tolist() == [1.0]


def test_a_tensor_with_no_elements_slices_whatever_its_other_dimensions(tmp_path):
    # Valid: no bytes; its other dimensions multiply past 64 bits, so its
    # row-major strides (the native plan's, torch's) overflow.
    path = tmp_path / "e.safetensors"
    header = b'{"a":{"dtype":"F32","shape":[0,1099511627776,1099511627776],"data_offsets":[0,0]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with safetensors.safe_open(path, "pt") as theirs:
        expected = tuple(theirs.get_slice("a")[0:0, 5:7].shape)
    assert expected == (0, 2, 1 << 40)
    for framework, backend in (("pt", "mmap"), ("pt", "pread"), ("np", "mmap"), ("np", "pread")):
        with tensafe.safe_open(path, framework, backend=backend) as f:
            assert tuple(f.get_slice("a")[0:0, 5:7].shape) == expected, (framework, backend)
    # The whole of it too, with torch, as the reference gives it (numpy
    # refuses an array whose dimensions multiply past 64 bits).
    with safetensors.safe_open(path, "pt") as theirs:
        whole = tuple(theirs.get_slice("a")[:].shape)
    for backend in ("mmap", "pread"):
        with tensafe.safe_open(path, "pt", backend=backend) as f:
            assert tuple(f.get_slice("a")[:].shape) == tuple(f.get_slice("a")[...].shape) == whole, backend
            assert tuple(f.get_tensor("a").shape) == whole, backend


def test_slice_errors_are_also_the_builtin_errors_torch_raises(tmp_path):
    path = tmp_path / "s.safetensors"
    ref_pt.save_file({"a": torch.zeros(3, 4)}, path)
    for framework in ("pt", "np"):
        with tensafe.safe_open(path, framework) as f:
            s = f.get_slice("a")
            for index, builtin in [(5, IndexError), (-4, IndexError), ((0, 0, 0), IndexError), (slice(None, None, -1), ValueError)]:
                with safetensors.safe_open(path, "pt") as theirs:
                    with pytest.raises(builtin):
                        theirs.get_slice("a")[index]
                with pytest.raises(builtin) as info:
                    s[index]
                assert isinstance(info.value, tensafe.SafetensorError), (framework, index)
    # On the native path, several ellipses are an IndexError as in numpy, and
    # so is an index list (which the reference does not implement there).
    with pytest.raises(IndexError):
        np.zeros((3, 4))[..., ...]
    with tensafe.safe_open(path, "np") as f:
        for index in [(Ellipsis, Ellipsis), [0, 1]]:
            with pytest.raises(IndexError):
                f.get_slice("a")[index]
    # Indices torch refuses are refused with torch's own error.
    with tensafe.safe_open(path, "pt") as f, pytest.raises(IndexError, match="out of bounds"):
        f.get_slice("a")[[0, 7]]
    # On a 0-d tensor, torch checks a lone slice's step before the rank (a
    # lone slice gets torch's own error; in a tuple, the rank comes first).
    ref_pt.save_file({"s": torch.tensor(3.0)}, path)
    for index in [slice(None, None, 0), slice(None, None, -1), slice(1, None), (slice(None, None, 0),)]:
        with safetensors.safe_open(path, "pt") as theirs, tensafe.safe_open(path, "pt") as ours:
            with pytest.raises((IndexError, ValueError)) as expected:
                theirs.get_slice("s")[index]
            text = re.escape(str(expected.value)) if isinstance(index, slice) else None
            with pytest.raises(type(expected.value), match=text):
                ours.get_slice("s")[index]


def test_of_several_wrong_indices_the_error_is_the_one_the_reference_reports(tmp_path):
    """numpy and the other frameworks: several ellipses, then each index in
    turn (its type, a slice's step), then the shape; torch (whose indexing
    the reference's torch path is): the shape before a step."""
    path = tmp_path / "s.safetensors"
    ref_pt.save_file({"m": torch.zeros(2, 3, 4), "s": torch.tensor(3.0)}, path)
    z = slice(None, None, 0)
    cases = [("m", (0, 0, 0, 0, z)), ("m", (7, z)), ("m", (z, 7)), ("s", (z,)), ("s", (0, z)), ("m", (z, "a")), ("m", ("a", z)),
             ("m", (7, Ellipsis, Ellipsis)), ("m", (Ellipsis, Ellipsis, z)), ("m", ("a", Ellipsis, Ellipsis)), ("m", (0, 0, 0, 7))]

    def error(f, name, index):
        with pytest.raises(Exception) as info:
            f.get_slice(name)[index]
        kinds = [kind.__name__ for kind in type(info.value).__mro__ if kind in (IndexError, ValueError, TypeError)]
        return kinds, str(info.value)

    for framework in ("pt", "np"):
        with safetensors.safe_open(path, framework) as theirs, tensafe.safe_open(path, framework) as ours:
            for name, index in cases:
                (their_kinds, their_text), (our_kinds, our_text) = error(theirs, name, index), error(ours, name, index)
                if framework == "pt":  # torch's own words there; the same class
                    assert our_kinds == their_kinds, (index, their_text, our_text)
                else:  # the reference's words, tensafe's with more detail after them
                    assert our_text.startswith(their_text.split(": expected")[0].strip()), (index, their_text, our_text)


def test_slice_errors_are_clear(tmp_path):
    path = tmp_path / "s.safetensors"
    ts_np.save_file({"a": np.zeros((10, 5), np.float32)}, path)
    with tensafe.safe_open(path, "np") as f:
        s = f.get_slice("a")
        with pytest.raises(tensafe.SafetensorError, match="index 5 out of bounds for tensor dimension #1 of size 5"):
            s[:, 5]
        with pytest.raises(tensafe.SafetensorError, match="more slicing indexes than dimensions"):
            s[0, 0, 0]
        with pytest.raises(tensafe.SafetensorError, match="step must be a positive integer"):
            s[::-1]
        with pytest.raises(tensafe.SafetensorError, match="Unsupported slice index at position 0"):
            s[1.5]


def test_f4_on_every_path(tmp_path):
    packed = torch.randint(0, 256, (2, 4), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    blob = ref_pt.save({"f": packed})
    path = _write(tmp_path, blob)
    assert ts_pt.save({"f": packed}) == blob
    for backend in ("mmap", "pread"):
        with tensafe.safe_open(path, "pt", backend=backend) as f:
            got = f.get_tensor("f")
            assert got.shape == (2, 4) and got.dtype == torch.float4_e2m1fn_x2
            assert torch.equal(got.view(torch.uint8), packed.view(torch.uint8))
            # Logical shape [2, 8]: row 1 is whole bytes.
            assert torch.equal(f.get_slice("f")[1].view(torch.uint8), packed[1].view(torch.uint8))
    assert torch.equal(ts_pt.load(blob)["f"].view(torch.uint8), packed.view(torch.uint8))


def test_names_with_control_characters_round_trip_like_the_reference(tmp_path):
    """Any JSON string is a valid name: the reference writes and reads control
    characters, so tensafe does too, byte for byte."""
    tensors = {"a\tb": torch.ones(2), "\x1b[2J": torch.zeros(1), "nl\nx\x00": torch.arange(3)}
    assert ts_pt.save(tensors) == ref_pt.save(tensors)
    path = tmp_path / "ctrl.safetensors"
    ref_pt.save_file(tensors, path)
    for backend in ("mmap", "pread"):
        with tensafe.safe_open(path, "pt", backend=backend) as f:
            assert f.keys() == sorted(tensors)
            got = f.get_tensors()
            assert sorted(got) == sorted(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)
    with pytest.raises(tensafe.SafetensorError, match=r"File does not contain tensor x\\u\{1b\}"):
        tensafe.safe_open(path, "pt").get_tensor("x\x1b")


def test_sub_byte_tensors_refuse_torch_only_indices(tmp_path):
    packed = torch.randint(0, 256, (2, 4), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    path = tmp_path / "f4.safetensors"
    ts_pt.save_file({"f": packed}, path)
    with tensafe.safe_open(path, "pt") as f:
        for index in (True, [0, 1], torch.tensor([True, False])):
            with pytest.raises(IndexError, match="F4 tensors .* take only ints, slices"):
                f.get_slice("f")[index]


def test_argument_errors_come_in_the_references_order(tmp_path):
    path = tmp_path / "a.safetensors"
    ref_pt.save_file({"a": torch.ones(1)}, path)
    cases = [("bogus", "cpu", 1), ("pt", "bogus", None), ("bogus", "cpu", None), (None, "cpu", "mmap"), ("pt", "cpu", 1), ("pt", "cpu", "bogus")]
    for framework, device, backend in cases:
        kinds = []
        for lib in (safetensors, tensafe):
            with pytest.raises(Exception) as info:
                lib.safe_open(path, framework, device=device, backend=backend)
            kinds.append(type(info.value).__name__)
        assert kinds[0] == kinds[1], (framework, device, backend, kinds)


def test_native_slice_errors_use_the_references_texts(tmp_path):
    path = tmp_path / "s.safetensors"
    ts_np.save_file({"a": np.zeros((10, 5), np.float32)}, path)
    for lib in (tensafe, safetensors):
        with lib.safe_open(path, "np") as f:
            with pytest.raises(lib.SafetensorError, match=r"^Only one ellipsis \(\.\.\.\) is allowed in slice index$"):
                f.get_slice("a")[..., ...]
            with pytest.raises(lib.SafetensorError, match=r"^Slice step must be a positive integer, got 0"):
                f.get_slice("a")[::0]


def test_non_str_tensor_names_are_a_type_error_like_the_reference():
    for ref_save, ts_save, value in ((ref_np.save, ts_np.save, np.ones(2)), (ref_pt.save, ts_pt.save, torch.ones(2))):
        with pytest.raises(TypeError):
            ref_save({1: value})
        with pytest.raises(TypeError):
            ts_save({1: value})


def test_safe_open_shows_the_references_parameters():
    """Code that looks for `backend` in the signature before passing it."""
    import inspect

    assert list(inspect.signature(tensafe.safe_open).parameters) == list(inspect.signature(safetensors.safe_open).parameters)


def test_every_file_that_cannot_be_opened_is_file_not_found_like_the_reference(tmp_path):
    """Callers catch FileNotFoundError to fall back; tensafe's message says why."""
    (tmp_path / "file").write_bytes(b"")
    for path, why in [(tmp_path / "file" / "x.safetensors", "Not a directory"), (tmp_path / "missing.safetensors", "No such file")]:
        for lib in (safetensors, tensafe):
            with pytest.raises(FileNotFoundError) as raised:
                lib.safe_open(str(path), "pt")
        assert why in str(raised.value)
    # A path object is local, whatever it spells: never a request to a server.
    with pytest.raises(FileNotFoundError):
        tensafe.safe_open(pathlib.Path("http://127.0.0.1:9/x.safetensors"), "pt")


def test_a_file_that_may_not_be_read_says_permission_denied(tmp_path):
    """The README's claim: the FileNotFoundError gives the real reason."""
    path = tmp_path / "locked.safetensors"
    ref_pt.save_file({"a": torch.zeros(2)}, path)
    path.chmod(0)

    def attempt() -> str:
        try:
            tensafe.safe_open(str(path), "pt")
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return "opened"

    if os.geteuid() != 0:
        message = attempt()
    else:  # root reads anything: try as nobody (denied the file, or the 0700 test directory), in a child
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                except OSError as e:
                    os.write(write_end, f"cannot become nobody: {e}".encode())
                else:
                    os.write(write_end, attempt().encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as reader:
            message = reader.read().decode()
        os.waitpid(pid, 0)
        if message.startswith("cannot become nobody"):
            pytest.skip(message)
    assert message.startswith("FileNotFoundError: ") and "Permission denied" in message, message

