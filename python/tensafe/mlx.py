"""mlx: the `safetensors.mlx` API on tensafe."""

from __future__ import annotations

import functools
import os
from typing import Dict, Optional, Union

import mlx.core as mx
import numpy as np

from . import _numpy_like
from ._open import _wrap

# The reference's module has these names too (code imports them from it).
from . import numpy  # noqa: F401
from ._open import safe_open  # noqa: F401


def save(tensors: Dict[str, mx.array], metadata: Optional[Dict[str, str]] = None) -> bytes:
    return _numpy_like.save(tensors, metadata, np.asarray, "mlx.core.array")


def save_file(tensors: Dict[str, mx.array], filename: Union[str, os.PathLike], metadata: Optional[Dict[str, str]] = None) -> None:
    _numpy_like.save(tensors, metadata, np.asarray, "mlx.core.array", filename)


#: numpy → mlx, as `safe_open` converts (a clear error for float8, which mlx lacks).
_from_numpy = functools.partial(_wrap, "mlx", "cpu")


def load(data: bytes) -> Dict[str, mx.array]:
    return _numpy_like.load(data, _from_numpy)


def load_file(filename: Union[str, os.PathLike], *, backend: str = "mmap") -> Dict[str, mx.array]:
    return _numpy_like.load_file(filename, "mlx", backend=backend)


def _np2mx(numpy_dict: Dict[str, np.ndarray]) -> Dict[str, mx.array]:
    return _numpy_like.convert_each(numpy_dict, _from_numpy)


def _mx2np(mx_dict: Dict[str, mx.array]) -> Dict[str, np.ndarray]:
    return _numpy_like.convert_each(mx_dict, np.asarray, in_place=False)
