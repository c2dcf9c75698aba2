"""paddle: the `safetensors.paddle` API on tensafe."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Union

import numpy as np
import paddle

from . import _dtypes, _numpy_like


def _to_numpy(tensor: Any):
    if not isinstance(tensor, paddle.Tensor):
        raise ValueError(f"expected paddle.Tensor but received {type(tensor)}")
    return np.asarray(tensor.cpu().numpy())


def _code(tensor: Any) -> str:
    """The dtype code from paddle's own dtype: paddle exports bfloat16 as uint16."""
    return _dtypes.BY_NAME[str(tensor.dtype).removeprefix("paddle.")]


def save(tensors: Dict[str, paddle.Tensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    return _numpy_like.save(tensors, metadata, _to_numpy, "paddle.Tensor", code_of=_code)


def save_file(tensors: Dict[str, paddle.Tensor], filename: Union[str, os.PathLike], metadata: Optional[Dict[str, str]] = None) -> None:
    _numpy_like.save(tensors, metadata, _to_numpy, "paddle.Tensor", filename, code_of=_code)


def from_numpy(array: Any, place: Any = "cpu") -> paddle.Tensor:
    """A paddle tensor from a numpy array; bfloat16 goes through paddle's uint16 form."""
    if array.dtype.name == "bfloat16":
        array = array.view(np.uint16)
    return paddle.to_tensor(array, place=place)


def load(data: bytes, device: str = "cpu") -> Dict[str, paddle.Tensor]:
    place = device.replace("cuda", "gpu")
    return _numpy_like.load(data, lambda a: from_numpy(a, place))


def load_file(filename: Union[str, os.PathLike], device: str = "cpu", *, backend: str = "mmap") -> Dict[str, paddle.Tensor]:
    return _numpy_like.load_file(filename, "paddle", device=device, backend=backend)
