"""tensorflow: the `safetensors.tensorflow` API on tensafe."""

from __future__ import annotations

import os
from typing import Dict, Optional, Union

import numpy as np
import tensorflow as tf

from . import _numpy_like

# The reference's module has these names too (code imports them from it).
from . import numpy  # noqa: F401
from ._open import safe_open  # noqa: F401


def _to_numpy(tensor: tf.Tensor):
    # Scalars come back as numpy scalars, not arrays.
    return np.asarray(tensor.numpy())


def save(tensors: Dict[str, tf.Tensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    return _numpy_like.save(tensors, metadata, _to_numpy, "tf.Tensor")


def save_file(tensors: Dict[str, tf.Tensor], filename: Union[str, os.PathLike], metadata: Optional[Dict[str, str]] = None) -> None:
    _numpy_like.save(tensors, metadata, _to_numpy, "tf.Tensor", filename)


def load(data: bytes) -> Dict[str, tf.Tensor]:
    return _numpy_like.load(data, tf.convert_to_tensor)


def load_file(filename: Union[str, os.PathLike], *, backend: str = "mmap") -> Dict[str, tf.Tensor]:
    return _numpy_like.load_file(filename, "tensorflow", backend=backend)


def _np2tf(numpy_dict: Dict[str, np.ndarray]) -> Dict[str, tf.Tensor]:
    return _numpy_like.convert_each(numpy_dict, tf.convert_to_tensor)


def _tf2np(tf_dict: Dict[str, tf.Tensor]) -> Dict[str, np.ndarray]:
    # `.numpy()` as it is: scalars stay numpy scalars, as the reference's are.
    return _numpy_like.convert_each(tf_dict, lambda tensor: tensor.numpy())
