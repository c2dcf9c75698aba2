"""flax/jax, tensorflow, mlx and paddle: for every dtype each framework holds,
tensafe writes the reference's bytes, and files written by either are read
identically by both.

Each framework is checked in its own interpreter: tensorflow and paddle crash
when loaded into one process (their bundled native libraries clash).
"""

import subprocess
import sys

import numpy as np
import pytest

DTYPES = ["bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16",
          "float32", "float64", "complex64", "bfloat16", "float8_e4m3fn", "float8_e5m2"]

#: dtypes a framework cannot hold (converting changes the dtype or fails),
#: checked below so that a framework release that adds one is noticed.
UNSUPPORTED = {
    "flax": {"int64", "uint64", "float64"},  # jax without x64 narrows them
    "tensorflow": set(),
    "mlx": {"float64", "bfloat16", "float8_e4m3fn", "float8_e5m2"},
    # paddle reads numpy uint16 as its bfloat16; bfloat16 itself is checked below.
    "paddle": {"uint16", "uint32", "uint64", "bfloat16", "float8_e4m3fn", "float8_e5m2"},
}

ALIASES = {"flax": "flax", "tensorflow": "tf", "mlx": "mlx", "paddle": "paddle"}


def converter(module):
    if module == "flax":
        import jax.numpy as jnp

        return jnp.asarray
    if module == "tensorflow":
        import tensorflow as tf

        return tf.convert_to_tensor
    if module == "mlx":
        import mlx.core as mx

        return mx.array
    import paddle

    return paddle.to_tensor


def as_numpy(value):
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value)


def sample(name, shape):
    import ml_dtypes

    dtype = np.dtype(getattr(ml_dtypes, name, None) or name)
    if name == "bool":
        return (np.arange(int(np.prod(shape))) % 3 == 0).reshape(shape)
    return (np.arange(int(np.prod(shape))) % 7).astype(np.float32).astype(dtype).reshape(shape)


def round_trips(convert, array):
    try:
        tensor = convert(array)
        back = as_numpy(tensor)
    except Exception:
        return False
    if str(tensor.dtype).startswith("paddle.") and str(tensor.dtype) != f"paddle.{array.dtype.name}":
        return False
    return back.dtype == array.dtype and back.tobytes() == array.tobytes()


@pytest.mark.parametrize("module", list(ALIASES))
def test_framework_against_the_reference(module, tmp_path):
    run = subprocess.run([sys.executable, __file__, module, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert f"checked {module}" in run.stdout


def check(module, tmp_path):
    import importlib
    import types

    import safetensors
    import tensafe

    ours = importlib.import_module(f"tensafe.{module}")
    ref = importlib.import_module(f"safetensors.{module}")
    convert = converter(module)
    alias = ALIASES[module]

    # Code imports from these modules what the reference's have, its own
    # helpers aside: `safe_open`, `numpy` (safetensors'), the core functions.
    taken = {
        name for name, value in vars(ref).items()
        if not name.startswith("_")
        and (
            value is getattr(safetensors, name, None)
            or (value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None) or "").startswith("safetensors")
        )
    }
    assert {"safe_open", "numpy", "save_file", "load_file"} <= taken, taken
    assert not taken - set(dir(ours)), taken - set(dir(ours))
    assert ours.safe_open is tensafe.safe_open and ours.numpy is importlib.import_module("tensafe.numpy")

    arrays = {f"{name}.{i}": sample(name, shape) for name in DTYPES for i, shape in enumerate([(2, 3), (5,)])}
    unsupported = {name for name in DTYPES if not round_trips(convert, sample(name, (2, 3)))}
    assert unsupported == UNSUPPORTED[module], f"{module} now holds a different set of dtypes: {unsupported}"
    arrays = {k: v for k, v in arrays.items() if k.split(".")[0] not in unsupported}
    arrays["scalar"] = np.array(2.5, dtype=np.float32)
    if module != "mlx":  # mlx has no zero-size arrays
        arrays["empty"] = np.zeros((0, 2), dtype=np.int32)
    tensors = {k: convert(v) for k, v in arrays.items()}
    original = dict(tensors)

    # Same bytes. The reference's tensorflow module cannot save scalars (tf
    # hands back a numpy scalar, which it treats as an array).
    data = ours.save(tensors, metadata={"framework": module})
    assert tensors == original, "the caller's dict is left alone"
    comparable = {k: convert(v) for k, v in arrays.items() if not (module == "tensorflow" and k == "scalar")}
    theirs = ref.save(comparable, metadata={"framework": module})
    assert ours.save({k: convert(v) for k, v in arrays.items() if k in comparable}, metadata={"framework": module}) == theirs

    # A filename that is not set is an error, as in the reference, not a
    # save into bytes that are thrown away.
    for lib in (ours, ref):
        with pytest.raises(TypeError, match="^argument 'filename': expected str, bytes or os.PathLike object, not NoneType$"):
            lib.save_file({"w": convert(np.zeros(2, np.float32))}, None)

    ours_path, ref_path = tmp_path / "ours.safetensors", tmp_path / "ref.safetensors"
    ours.save_file(tensors, ours_path)
    assert ours_path.read_bytes() == ours.save(tensors)
    ref_path.write_bytes(theirs)

    # Files written by either, read by both, give the same values.
    for path, keys in ((ours_path, arrays), (ref_path, comparable)):
        with tensafe.safe_open(path, alias) as a, safetensors.safe_open(path, alias) as b:
            assert a.keys() == b.keys() == sorted(keys)
            for key in keys:
                x = as_numpy(a.get_tensor(key))
                assert x.dtype == arrays[key].dtype and x.tobytes() == arrays[key].tobytes(), key
                if key.startswith("float8"):
                    # The reference looks fp8 up on numpy itself and fails.
                    with pytest.raises(AttributeError):
                        b.get_tensor(key)
                    continue
                if module == "paddle" and key == "empty":
                    # The reference's paddle mmap path cannot build zero-size tensors.
                    with pytest.raises(ValueError, match="strides"):
                        b.get_tensor(key)
                    continue
                y = as_numpy(b.get_tensor(key))
                assert y.dtype == x.dtype and y.tobytes() == x.tobytes(), key
    for loaded in (ours.load(data), ours.load_file(ours_path), ours.load_file(ours_path, backend="pread")):
        assert set(loaded) == set(arrays)
        for k, v in loaded.items():
            assert as_numpy(v).tobytes() == arrays[k].tobytes(), k
    with tensafe.safe_open(ours_path, alias) as f:
        want = arrays["float32.0"][1:, ::2]
        assert as_numpy(f.get_slice("float32.0")[1:, ::2]).tobytes() == want.tobytes()
    check_private_converters(ours, ref, arrays)
    if module == "paddle":
        for lib in (ours, ref):
            with pytest.raises(ValueError, match="^Key `bad` is invalid, expected paddle.Tensor but received <class 'list'>$"):
                lib.save({"bad": [1.0]})
        check_paddle_bfloat16(ours, ref, tmp_path)
        check_paddle_dtypes_built_from_bytes(ours, tmp_path)
        check_paddle_slices(ref, tmp_path)
        import paddle

        # `load`'s device, as the reference takes it: a string, a Place, or None.
        small = ours.save({"w": paddle.to_tensor([1.0, 2.0])})
        for device in ("cpu", paddle.CPUPlace(), None):
            assert str(ours.load(small, device=device)["w"].place) == str(ref.load(small, device=device)["w"].place) == "Place(cpu)"
        # A bare "cuda" or "gpu": paddle's own answer (its ValueError in a
        # CPU build), not a crash inside its device parser.
        for device in ("cuda", "gpu"):
            outcomes = []
            for lib in (ours, ref):
                try:
                    outcomes.append(str(lib.load(small, device=device)["w"].place))
                except Exception as e:
                    outcomes.append(type(e).__name__)
            assert outcomes[0] == outcomes[1], (device, outcomes)
    if module == "flax":
        from flax.core import FrozenDict

        # Any mapping saves (the reference's flax module fails on a FrozenDict).
        frozen = FrozenDict({"w": converter(module)(np.arange(4, dtype=np.float32))})
        assert ours.save(frozen) == ref.save(dict(frozen))
    if module == "mlx":
        import ml_dtypes

        import tensafe.numpy

        # mlx has no float8: said so, not mlx's bare "std::bad_cast".
        tensafe.numpy.save_file({"f8": np.zeros(3, ml_dtypes.float8_e4m3fn)}, tmp_path / "f8.safetensors")
        with tensafe.safe_open(tmp_path / "f8.safetensors", "mlx") as f, pytest.raises(tensafe.SafetensorError, match="mlx has no float8_e4m3fn type"):
            f.get_tensor("f8")
        for load in (lambda: ours.load((tmp_path / "f8.safetensors").read_bytes()), lambda: ours._np2mx({"f8": np.zeros(3, ml_dtypes.float8_e4m3fn)})):
            with pytest.raises(tensafe.SafetensorError, match="mlx has no float8_e4m3fn type"):
                load()


def check_paddle_slices(ref, tmp_path):
    """The reference indexes paddle slices with paddle's own rules (booleans
    as masks, negative steps, index lists) and raises paddle's errors: the
    same values, shapes and error classes, on both backends."""
    import paddle
    import safetensors

    import tensafe

    path = tmp_path / "slices.safetensors"
    ref.save_file({"m": paddle.arange(12, dtype="float32").reshape([3, 4]), "s": paddle.to_tensor(5.0)}, path)
    indices = [True, False, (0, True), slice(None, None, -1), (slice(None), slice(3, 0, -2)), [0, 2], np.array([0, 2]), (0, [1]), 5, -4,
               (0, 9), (slice(None), slice(None, None, 2)), (1, slice(1, 3)), Ellipsis, (None, 0), slice(0, 0), slice(None, None, 0),
               (0, 0, 0), (Ellipsis, Ellipsis), slice(5, 1), slice(100, 200),
               # paddle's own booleans and 0-d uint8 tensors are masks too, not the ints 1 and 0
               paddle.to_tensor(True), paddle.to_tensor(False), (0, paddle.to_tensor(True)), paddle.to_tensor(1, dtype="uint8")]

    def outcome(f, name, index):
        try:
            got = f.get_slice(name)[index]
            return list(got.shape), got.numpy().tolist()
        except Exception as e:
            return [kind.__name__ for kind in type(e).__mro__ if kind in (IndexError, ValueError, TypeError)]

    for backend in ("mmap", "pread"):
        with safetensors.safe_open(path, "paddle") as theirs, tensafe.safe_open(path, "paddle", backend=backend) as f:
            for name in ("m", "s"):
                for index in indices:
                    assert outcome(f, name, index) == outcome(theirs, name, index), (backend, name, index)

    # Packed float4 (two elements a byte, which the reference cannot load
    # into paddle): paddle would index bytes where a slice counts elements.
    header = b'{"f":{"dtype":"F4","shape":[2,4],"data_offsets":[0,4]}}'
    (tmp_path / "f4.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes([0x10, 0x32, 0x54, 0x76]))
    with tensafe.safe_open(tmp_path / "f4.safetensors", "paddle") as f:
        assert f.get_slice("f")[:, 2:4].numpy().tolist() == [[0x32], [0x76]]
        for index in [(slice(None), [1]), (slice(None), slice(None, None, -1)), (0, 9)]:
            with pytest.raises(tensafe.SafetensorError):
                f.get_slice("f")[index]


def check_private_converters(ours, ref, arrays):
    """The reference's `_np2…` and `_…2np` helpers (code imports them too):
    the same values and types, the same dict handed back (the caller's,
    converted in place, or a new one), and a copy of the caller's arrays
    where the reference copies them (the caller may reuse its arrays)."""
    import re

    names = sorted(name for name in vars(ref) if re.fullmatch(r"_np2[a-z]+|_[a-z]+2np", name))
    assert len(names) == 2, names
    for name in names:
        to_numpy = name.endswith("2np")
        outcomes = []
        for lib in (ours, ref):
            given = {k: converter(lib.__name__.split(".")[-1])(v) if to_numpy else v for k, v in arrays.items()}
            got = getattr(lib, name)(given)
            shared = {k: not to_numpy and np.shares_memory(np.asarray(as_numpy(v)), arrays[k]) for k, v in got.items()}
            outcomes.append((got is given, shared, {k: (type(v), np.asarray(as_numpy(v)).dtype, as_numpy(v).tobytes()) for k, v in got.items()}))
        assert outcomes[0] == outcomes[1], name


def check_paddle_bfloat16(ours, ref, tmp_path):
    import paddle

    import tensafe

    t = {"w": paddle.to_tensor([[1.0, -2.5, 3.0]]).astype("bfloat16")}
    data = ours.save(t)
    assert data == ref.save(t) and b'"BF16"' in data
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(data)
    for loaded in (ours.load(data)["w"], ours.load_file(path)["w"], tensafe.safe_open(path, "paddle").get_tensor("w")):
        assert str(loaded.dtype) == "paddle.bfloat16"
        assert loaded.astype("float32").numpy().tolist() == [[1.0, -2.5, 3.0]]


def check_paddle_dtypes_built_from_bytes(ours, tmp_path):
    """fp8 and 32/64-bit unsigned tensors, which paddle has but does not take
    from numpy: loaded with their paddle dtype and bytes, saved back as is."""
    import safetensors.numpy as ref_np
    import tensafe

    arrays = {name: sample(name, (2, 3)) for name in ("float8_e4m3fn", "float8_e5m2", "uint32", "uint64")}
    arrays["fp8 scalar"] = sample("float8_e4m3fn", ())
    data = ref_np.save(arrays)
    path = tmp_path / "bytes.safetensors"
    path.write_bytes(data)
    with tensafe.safe_open(path, "paddle") as f:
        loaded = {k: f.get_tensor(k) for k in f.keys()}
    for group in (loaded, ours.load(data), ours.load_file(path)):
        for key, array in arrays.items():
            tensor = group[key]
            assert str(tensor.dtype) == f"paddle.{array.dtype.name}" and list(tensor.shape) == list(array.shape), key
            assert np.asarray(tensor.numpy()).tobytes() == array.tobytes(), key
    assert ours.save(loaded) == data


if __name__ == "__main__":
    import pathlib

    check(sys.argv[1], pathlib.Path(sys.argv[2]))
    print(f"checked {sys.argv[1]}")
