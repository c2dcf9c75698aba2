"""paddle: the `safetensors.paddle` API on tensafe."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Union

import numpy as np
import paddle

from . import _dtypes, _numpy_like

# The reference's module has these names too (code imports them from it).
from . import numpy  # noqa: F401
from ._open import safe_open  # noqa: F401
from ._tensafe_rust import TensorSpec, deserialize, serialize, serialize_file  # noqa: F401
from ._tensafe_rust import printable


def _checked(tensors: Any) -> Any:
    """The reference's check, with its message: every value is a paddle.Tensor."""
    if isinstance(tensors, dict):
        for name, value in tensors.items():
            if not isinstance(value, paddle.Tensor):
                raise ValueError(f"Key `{printable(name)}` is invalid, expected paddle.Tensor but received {type(value)}")
    return tensors


def _to_numpy(tensor: paddle.Tensor):
    return np.asarray(tensor.cpu().numpy())


def _code(tensor: Any) -> str:
    """The dtype code from paddle's own dtype: paddle exports bfloat16 as uint16."""
    return _dtypes.BY_NAME[str(tensor.dtype).removeprefix("paddle.")]


def save(tensors: Dict[str, paddle.Tensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    return _numpy_like.save(_checked(tensors), metadata, _to_numpy, "paddle.Tensor", code_of=_code)


def save_file(tensors: Dict[str, paddle.Tensor], filename: Union[str, os.PathLike], metadata: Optional[Dict[str, str]] = None) -> None:
    _numpy_like.save(_checked(tensors), metadata, _to_numpy, "paddle.Tensor", filename, code_of=_code)


#: Dtypes paddle has but does not take from numpy arrays: built from the
#: bytes as uint8, then viewed as the dtype.
_VIEWED_FROM_BYTES = ("uint32", "uint64", "float8_e4m3fn", "float8_e5m2")


def from_numpy(array: Any, place: Any = "cpu") -> paddle.Tensor:
    """A paddle tensor from a numpy array; bfloat16 goes through paddle's
    uint16 form, and the dtypes of `_VIEWED_FROM_BYTES` through bytes."""
    name = array.dtype.name
    if name == "bfloat16":
        array = array.view(np.uint16)
    elif name in _VIEWED_FROM_BYTES and hasattr(paddle, name):
        dtype = getattr(paddle, name)
        if array.ndim == 0:
            # Needs a reshape, which paddle has no uint32/uint64 kernel for
            # (the reference fails there too).
            return paddle.to_tensor(array.reshape(1).view(np.uint8), place=place).view(dtype).reshape([])
        # Bytes in the same shape but the last dimension, viewed back: no
        # reshape. (Empty tensors fail in paddle's view, as in the reference.)
        return paddle.to_tensor(np.ascontiguousarray(array).view(np.uint8), place=place).view(dtype)
    return paddle.to_tensor(array, place=place)


def place_of(device: Any) -> Any:
    """paddle's place for a `device` argument: a string names the device as
    torch would ("cuda:0" is paddle's "gpu:0"); a paddle Place is taken as it
    is, and None is the CPU, as the reference takes them."""
    if device is None:
        return "cpu"
    if device in ("cuda", "gpu"):
        # A CPU build of paddle fails inside its own parser on a bare "gpu"
        # (AttributeError); with the index it raises its ValueError.
        return "gpu:0"
    return device.replace("cuda", "gpu") if isinstance(device, str) else device


def load(data: bytes, device: Any = "cpu") -> Dict[str, paddle.Tensor]:
    place = place_of(device)
    return _numpy_like.load(data, lambda a: from_numpy(a, place))


def load_file(filename: Union[str, os.PathLike], device: str = "cpu", *, backend: str = "mmap") -> Dict[str, paddle.Tensor]:
    return _numpy_like.load_file(filename, "paddle", device=device, backend=backend)


def _np2paddle(numpy_dict: Dict[str, np.ndarray], device: Any = "cpu") -> Dict[str, paddle.Tensor]:
    place = place_of(device)
    return _numpy_like.convert_each(numpy_dict, lambda array: from_numpy(array, place))


def _paddle2np(paddle_dict: Dict[str, paddle.Tensor]) -> Dict[str, np.ndarray]:
    return _numpy_like.convert_each(paddle_dict, _to_numpy)
