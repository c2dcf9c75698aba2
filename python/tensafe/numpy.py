"""numpy: `save`, `save_file`, `load`, `load_file`, as in `safetensors.numpy`.

Unlike the reference, non-contiguous arrays are saved with their logical
values, bfloat16/float8 work through ml_dtypes, and `load` handles every dtype.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from . import _dtypes, _numpy_like, _save
from ._open import _to_numpy, safe_open
from ._tensafe_rust import TensorSpec, deserialize, serialize, serialize_file  # noqa: F401  (the reference's module has them)


def _items(tensor_dict: Dict[str, np.ndarray]):
    # Any mapping, as the reference's (which only calls `items()`) takes.
    return _numpy_like.items(tensor_dict, lambda array: array, "np.ndarray")


def save(tensor_dict: Dict[str, np.ndarray], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """Serializes arrays to bytes."""
    return _save.write(_items(tensor_dict), metadata)


def save_file(tensor_dict: Dict[str, np.ndarray], filename: Union[str, os.PathLike], metadata: Optional[Dict[str, str]] = None) -> None:
    """Saves arrays to a file (atomically), or uploads them to an s3://, gs:// or az:// URL."""
    _save.write(_items(tensor_dict), metadata, filename)


def save_sharded(
    tensor_dict: Dict[str, np.ndarray],
    save_directory: Union[str, os.PathLike],
    max_shard_size: Union[int, str] = "5GB",
    metadata: Optional[Dict[str, str]] = None,
) -> Optional[Dict[str, Any]]:
    """Saves arrays as shards plus an index (see `tensafe.torch.save_sharded`)."""
    return _save.write_sharded(_items(tensor_dict), save_directory, max_shard_size, metadata)


def load(data: bytes) -> Dict[str, np.ndarray]:
    """Loads arrays from bytes, in file order."""
    return _view2np(deserialize(data))


# -- the reference module's helpers, for code that reaches into it -----------

#: Header code -> numpy dtype, for every code numpy can hold (bfloat16 and
#: float8 through ml_dtypes when it is installed).
_TYPES: Dict[str, Any] = {}
for _code in _dtypes.BY_CODE:
    try:
        _TYPES[_code] = _dtypes.numpy_dtype(_code)
    except Exception:  # no numpy type for it here (ml_dtypes missing)
        pass


def _getdtype(dtype_str: str) -> Any:
    return _TYPES[dtype_str]


def _view2np(safeview: List[Tuple[str, Dict[str, Any]]]) -> Dict[str, np.ndarray]:
    """Arrays from `deserialize`'s output."""
    return {name: _to_numpy(t["dtype"], t["shape"], t["data"]) for name, t in safeview}


def _is_little_endian(tensor: np.ndarray) -> bool:
    byteorder = tensor.dtype.byteorder
    return byteorder in "<|" or (byteorder == "=" and sys.byteorder == "little")


def _flatten(tensor_dict: Dict[str, np.ndarray], keep_alive_buffer: List[Any]) -> Dict[str, TensorSpec]:
    """The reference's raw-pointer form of a save: one `TensorSpec` per
    array, over contiguous little-endian copies where needed (kept alive in
    `keep_alive_buffer`)."""
    flattened = {}
    for name, code, shape, data in _items(tensor_dict):
        keep_alive_buffer.append(data)
        flattened[name] = TensorSpec(dtype=_dtypes.framework_name(code), shape=shape, data_ptr=data.ctypes.data, data_len=data.nbytes)
    return flattened


def load_file(
    filename: Union[str, os.PathLike], *, backend: str = "mmap", threads: Optional[int] = None, progress: Any = None, drop_cache: bool = False
) -> Dict[str, np.ndarray]:
    """Loads every array of a file, in file order (see `tensafe.torch.load_file`)."""
    with safe_open(filename, framework="np", backend=backend) as f:
        return f.get_tensors(threads=threads, progress=progress, drop_cache=drop_cache)
