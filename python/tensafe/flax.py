"""flax / jax: the `safetensors.flax` API on tensafe."""

from __future__ import annotations

import os
from typing import Dict, Optional, Union

import jax.numpy as jnp
import numpy as np

from . import _numpy_like

# The reference's module has these names too (code imports them from it).
from . import numpy  # noqa: F401
from ._open import safe_open  # noqa: F401
from jax import Array  # noqa: F401


def save(tensors: Dict[str, jnp.ndarray], metadata: Optional[Dict[str, str]] = None) -> bytes:
    return _numpy_like.save(tensors, metadata, np.asarray, "jax.Array")


def save_file(tensors: Dict[str, jnp.ndarray], filename: Union[str, os.PathLike], metadata: Optional[Dict[str, str]] = None) -> None:
    _numpy_like.save(tensors, metadata, np.asarray, "jax.Array", filename)


def load(data: bytes) -> Dict[str, jnp.ndarray]:
    return _numpy_like.load(data, jnp.asarray)


def load_file(filename: Union[str, os.PathLike], *, backend: str = "mmap") -> Dict[str, jnp.ndarray]:
    return _numpy_like.load_file(filename, "flax", backend=backend)


def _np2jnp(numpy_dict: Dict[str, np.ndarray]) -> Dict[str, jnp.ndarray]:
    # `jnp.array`, a copy, as the reference's: the caller may reuse its arrays.
    return _numpy_like.convert_each(numpy_dict, jnp.array)


def _jnp2np(jnp_dict: Dict[str, jnp.ndarray]) -> Dict[str, np.ndarray]:
    return _numpy_like.convert_each(jnp_dict, np.asarray)
