"""flax/jax, tensorflow, mlx and paddle: same bytes as the reference, same values back.

Each framework is checked in its own interpreter: tensorflow and paddle crash
when loaded into one process (their bundled native libraries clash).
"""

import subprocess
import sys

import numpy as np
import pytest

import safetensors.numpy
import tensafe

ARRAYS = {
    "w": np.arange(12, dtype=np.float32).reshape(3, 4),
    "i": np.arange(5, dtype=np.int64),
    "h": np.linspace(0, 1, 6, dtype=np.float16).reshape(2, 3),
    "scalar": np.array(2.5, dtype=np.float64),
    "empty": np.zeros((0, 2), dtype=np.int32),
    "b": np.array([True, False, True]),
}

FRAMEWORKS = {
    "flax": (lambda a: __import__("jax.numpy", fromlist=["_"]).asarray(a), "flax"),
    "tensorflow": (lambda a: __import__("tensorflow").convert_to_tensor(a), "tf"),
    "mlx": (lambda a: __import__("mlx.core", fromlist=["_"]).array(a), "mlx"),
    "paddle": (lambda a: __import__("paddle").to_tensor(a), "paddle"),
}


def _as_numpy(value):
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


@pytest.mark.parametrize("module", list(FRAMEWORKS))
def test_framework_round_trip_against_the_reference(module, tmp_path):
    run = subprocess.run([sys.executable, __file__, module, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert f"checked {module}" in run.stdout


def check(module, tmp_path):
    import importlib

    ours = importlib.import_module(f"tensafe.{module}")
    ref = importlib.import_module(f"safetensors.{module}")
    convert, alias = FRAMEWORKS[module]
    arrays = dict(ARRAYS)
    if module == "mlx":  # mlx has no float64 or zero-size tensors on CPU
        arrays = {k: v for k, v in arrays.items() if k not in ("scalar", "empty")}
    tensors = {k: convert(v) for k, v in arrays.items()}
    original = dict(tensors)

    data = ours.save(tensors, metadata={"framework": module})
    assert tensors == original, "the caller's dict is left alone"
    # The reference's tensorflow module cannot save scalars (tf returns a numpy
    # scalar, which it treats as an array); compare the rest byte for byte.
    comparable = {k: v for k, v in arrays.items() if not (module == "tensorflow" and k == "scalar")}
    assert ours.save({k: convert(v) for k, v in comparable.items()}, metadata={"framework": module}) == ref.save(
        {k: convert(v) for k, v in comparable.items()}, metadata={"framework": module}
    )
    path = tmp_path / "f.safetensors"
    ours.save_file(tensors, path)
    assert path.read_bytes() == ours.save(tensors)

    for loaded in (ours.load(data), ours.load_file(path), ours.load_file(path, backend="pread")):
        assert set(loaded) == set(arrays)
        for k, v in loaded.items():
            np.testing.assert_array_equal(_as_numpy(v), arrays[k])
    with tensafe.safe_open(path, alias) as f:
        np.testing.assert_array_equal(_as_numpy(f.get_slice("w")[1:, ::2]), arrays["w"][1:, ::2])


if __name__ == "__main__":
    import pathlib

    check(sys.argv[1], pathlib.Path(sys.argv[2]))
    print(f"checked {sys.argv[1]}")
