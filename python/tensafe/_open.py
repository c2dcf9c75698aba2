"""`safe_open`: lazy access to the tensors of a file, for every framework."""

from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Union

from . import _dtypes
from ._tensafe_rust import File, SafetensorError

_FRAMEWORKS = {
    "pt": "pt", "torch": "pt", "pytorch": "pt",
    "np": "numpy", "numpy": "numpy",
    "tf": "tensorflow", "tensorflow": "tensorflow",
    "jax": "flax", "flax": "flax",
    "mlx": "mlx",
    "paddle": "paddle",
}
_ACCELERATORS = ("cuda", "npu", "xpu", "xla", "mlu", "hpu", "musa")
_DEVICE_RE = re.compile(r"^(%s)(?::(\d+))?$" % "|".join(_ACCELERATORS))


def _framework(framework: Any) -> str:
    try:
        return _FRAMEWORKS[framework]
    except (KeyError, TypeError):
        raise SafetensorError(f"framework {framework} is invalid") from None


def _device(device: Any) -> Union[str, int]:
    """Normalises a device argument the way the reference accepts it."""
    if device is None or device == "cpu":
        return "cpu"
    if isinstance(device, bool):
        raise SafetensorError(f"device {device} is invalid")
    if isinstance(device, int):
        if device < 0:
            raise SafetensorError(f"device {device} is invalid")
        return device
    if isinstance(device, str):
        if device in ("mps", "mps:0"):
            return device
        if device.startswith("mps:"):
            raise SafetensorError(f"device {device} is invalid: only mps or mps:0 is supported")
        m = _DEVICE_RE.match(device)
        if m:
            return f"{m.group(1)}:{m.group(2) or 0}"
    raise SafetensorError(f"device {device} is invalid")


def _to_numpy(code: str, shape: List[int], buf: Any) -> Any:
    import numpy as np

    dtype = _dtypes.numpy_dtype(code)
    shape = _dtypes.packed_shape(code, shape) if code == "F4" else shape
    if len(buf) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def _to_torch(code: str, shape: List[int], buf: Any, device: Union[str, int]) -> Any:
    import torch

    dtype = _dtypes.torch_dtype(code)
    shape = _dtypes.packed_shape(code, shape)
    if isinstance(buf, memoryview) and buf.readonly:
        # torch tensors are always writable: never hand one out over a caller's
        # immutable bytes.
        buf = bytearray(buf)
    if len(buf) == 0:
        tensor = torch.empty(shape, dtype=dtype)
    else:
        tensor = torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)
    if device != "cpu":
        tensor = tensor.to(device)
    return tensor


def _convert(framework: str, device: Union[str, int], code: str, shape: List[int], buf: Any) -> Any:
    """Builds a framework tensor over `buf` (zero-copy where the framework allows)."""
    if framework == "pt":
        return _to_torch(code, shape, buf, device)
    array = _to_numpy(code, shape, buf)
    if framework == "numpy":
        return array
    if framework == "flax":
        import jax.numpy as jnp

        return jnp.asarray(array)
    if framework == "tensorflow":
        import tensorflow as tf

        return tf.convert_to_tensor(array)
    if framework == "mlx":
        import mlx.core as mx

        return mx.array(array)
    if framework == "paddle":
        from .paddle import from_numpy

        return from_numpy(array, device.replace("cuda", "gpu") if isinstance(device, str) else device)
    raise SafetensorError(f"framework {framework} is invalid")


_NUMPY_LIKE = {"numpy": "numpy", "tensorflow": "tensorflow", "flax": "flax", "mlx": "mlx"}


class safe_open:
    """Opens a safetensors file for lazy reads: `with safe_open(path, "pt") as f: f.get_tensor(name)`.

    `backend="mmap"` (default) maps the file copy-on-write: tensors are zero-copy
    views and nothing is read before it is touched. Writing into a returned
    tensor never reaches the file, but is visible to later `get_tensor` calls
    on the same handle (as with the reference). `backend="pread"` reads each
    tensor into private memory with positional reads, the better choice on
    network and FUSE filesystems; `backend="auto"` picks `pread` there and
    `mmap` elsewhere.
    """

    def __init__(self, filename: Union[str, "os.PathLike[str]"], framework: str, device: Any = "cpu", *, backend: str = "mmap"):
        self._framework = _framework(framework)
        self._device = _device(device)
        if backend not in ("mmap", "pread", "auto"):
            raise SafetensorError(f'backend "{backend}" is invalid (expected one of: "mmap", "pread", "auto")')
        if self._framework in _NUMPY_LIKE and self._device != "cpu":
            raise SafetensorError(f"Device {device} is not supported for framework {_NUMPY_LIKE[self._framework]}")
        self._file: Optional[File] = _open_source(filename, backend)

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> "safe_open":
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        # Tensors already handed out keep the mapping alive on their own.
        self._file = None

    def _open(self) -> File:
        if self._file is None:
            raise SafetensorError("File is closed")
        return self._file

    # -- header ------------------------------------------------------------
    def keys(self) -> List[str]:
        """Tensor names, sorted."""
        return self._open().keys()

    def offset_keys(self) -> List[str]:
        """Tensor names in file order."""
        return self._open().offset_keys()

    def metadata(self) -> Optional[Dict[str, str]]:
        """The `__metadata__` map, or None."""
        return self._open().metadata()

    # -- tensors -----------------------------------------------------------
    def get_tensor(self, name: str) -> Any:
        file = self._open()
        code, shape, _begin, _end = file.info(name)
        return _convert(self._framework, self._device, code, shape, file.buffer(name))

    def get_tensors(self) -> Dict[str, Any]:
        """Every tensor, in file order."""
        file = self._open()
        framework, device = self._framework, self._device
        return {name: _convert(framework, device, code, shape, file.buffer(name)) for name, code, shape in file.infos()}

    def get_slice(self, name: str) -> "PySafeSlice":
        file = self._open()
        code, shape, _begin, _end = file.info(name)
        return PySafeSlice(file, name, code, shape, self._framework, self._device)


class PySafeSlice:
    """A tensor not yet read: `get_shape()`, `get_dtype()` and numpy-style `[...]`
    that reads only the selected bytes."""

    def __init__(self, file: File, name: str, code: str, shape: List[int], framework: str, device: Any):
        self._file, self._name, self._code, self._shape = file, name, code, shape
        self._framework, self._device = framework, device

    def get_shape(self) -> List[int]:
        return list(self._shape)

    def get_dtype(self) -> str:
        return self._code

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, list) and not index:
            index = slice(0, 0)
        shape, data = self._file.read_slice(self._name, index)
        return _convert(self._framework, self._device, self._code, shape, data)


def _open_source(source: Any, backend: str) -> File:
    """A path, a bytes-like object holding a whole file, or a file object."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return File.from_bytes(source)
    if isinstance(source, (str, os.PathLike)):
        return File(os.fspath(source), backend)
    if hasattr(source, "read"):
        name = getattr(source, "name", None)
        if isinstance(name, (str, os.PathLike)) and os.path.isfile(name):
            return File(os.fspath(name), backend)
        return File.from_bytes(source.read())
    raise TypeError(f"expected a path, a bytes-like object or a file object, got {type(source).__name__}")


def _safe_open_handle(f: Any, framework: str, device: Any = "cpu", *, backend: str = "mmap") -> safe_open:
    """Like `safe_open`, from an open file object (reopened by its name)."""
    if not hasattr(f, "fileno"):
        raise TypeError("expected a file object with a fileno() method")
    return safe_open(f.name, framework, device, backend=backend)
