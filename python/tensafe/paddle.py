"""paddle: the `safetensors.paddle` API on tensafe."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Union

import numpy as np
import paddle

from . import _numpy_like


def _to_numpy(tensor: Any):
    if not isinstance(tensor, paddle.Tensor):
        raise ValueError(f"expected paddle.Tensor but received {type(tensor)}")
    return np.asarray(tensor.cpu().numpy())


def save(tensors: Dict[str, paddle.Tensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    return _numpy_like.save(tensors, metadata, _to_numpy, "paddle.Tensor")


def save_file(tensors: Dict[str, paddle.Tensor], filename: Union[str, os.PathLike], metadata: Optional[Dict[str, str]] = None) -> None:
    _numpy_like.save(tensors, metadata, _to_numpy, "paddle.Tensor", filename)


def load(data: bytes, device: str = "cpu") -> Dict[str, paddle.Tensor]:
    place = device.replace("cuda", "gpu")
    return _numpy_like.load(data, lambda a: paddle.to_tensor(a, place=place))


def load_file(filename: Union[str, os.PathLike], device: str = "cpu", *, backend: str = "mmap") -> Dict[str, paddle.Tensor]:
    return _numpy_like.load_file(filename, "paddle", device=device, backend=backend)
