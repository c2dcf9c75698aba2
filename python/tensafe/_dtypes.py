"""Dtype lookups for the frameworks, built from the core crate's single dtype table.

`_tensafe_rust.DTYPES` lists `(code, bits, framework_name)`; the framework name
is both torch's attribute name (`torch.<name>`) and numpy/ml_dtypes' dtype name.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from ._tensafe_rust import DTYPES, SUPPORTED_DTYPE_NAMES, SafetensorError

#: code -> (bits, framework name or None)
BY_CODE: Dict[str, Tuple[int, Optional[str]]] = {code: (bits, name) for code, bits, name in DTYPES}
#: framework name -> code
BY_NAME: Dict[str, str] = {name: code for code, _bits, name in DTYPES if name is not None}

#: numpy has these natively; the others (bfloat16, float8_*) come from ml_dtypes.
_NUMPY_NATIVE = {
    "bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64", "complex64",
}


def framework_name(code: str) -> str:
    """The framework dtype name of a header code; F6 types have none."""
    try:
        name = BY_CODE[code][1]
    except KeyError:
        raise SafetensorError(f"Dtype not understood: {code}") from None
    if name is None:
        raise SafetensorError(f"Dtype not understood: {code}")
    return name


def numpy_dtype(code: str) -> Any:
    """The numpy dtype for a header code (ml_dtypes for bfloat16 and float8).

    F4 has no packed numpy type: it loads as uint8 bytes, two values per byte,
    exactly like torch's `float4_e2m1fn_x2` (last dimension halved).
    """
    import numpy as np

    name = framework_name(code)
    if code == "F4":
        return np.dtype(np.uint8)
    if name in _NUMPY_NATIVE:
        return np.dtype(name)
    try:
        import ml_dtypes
    except ImportError:
        raise SafetensorError(
            f"Dtype {code} needs the ml_dtypes package for numpy (pip install ml_dtypes)"
        ) from None
    return np.dtype(getattr(ml_dtypes, name))


def code_for_numpy(dtype: Any) -> str:
    """The header code for a numpy dtype (by name, as ml_dtypes names them)."""
    try:
        return BY_NAME[dtype.name]
    except KeyError:
        raise SafetensorError(f'Unknown dtype "{dtype.name}". Supported dtypes: {", ".join(SUPPORTED_DTYPE_NAMES)}') from None


def torch_dtype(code: str) -> Any:
    import torch

    name = framework_name(code)
    try:
        return getattr(torch, name)
    except AttributeError:
        raise SafetensorError(f"Dtype {code} needs a newer torch (torch.{name} is missing)") from None


def packed_shape(code: str, shape: list) -> list:
    """Framework shape of a tensor: F4 packs two values per element (last dim halved)."""
    if code != "F4":
        return list(shape)
    if not shape or shape[-1] % 2:
        raise SafetensorError(f"f4_x2 dtype requires that the last dim be divisible by 2 in torch: got {list(shape)}")
    return [*shape[:-1], shape[-1] // 2]


def byte_size(code: str, shape: list) -> int:
    """Bytes of a tensor of `code` and logical `shape`."""
    elements = 1
    for dim in shape:
        elements *= dim
    return elements * BY_CODE[code][0] // 8
