"""Shared body of the frameworks that save through numpy (flax, tensorflow, mlx, paddle)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Dict, Optional

from . import _save
from ._open import _to_numpy, safe_open
from ._tensafe_rust import deserialize


ToNumpy = Callable[[Any], Any]


def items(tensors: Dict[str, Any], to_numpy: ToNumpy, kind: str, code_of: Optional[Callable[[Any], Optional[str]]] = None) -> list:
    """Converts values with `to_numpy` into a new list; the caller's dict (any
    mapping: a flax FrozenDict too) is left alone (the reference's flax and
    tensorflow modules overwrite it). `code_of` gives a value's dtype code
    when its numpy form does not tell it."""
    if not isinstance(tensors, Mapping):
        raise ValueError(f"Expected a dict of [str, {kind}] but received {type(tensors)}")
    return [_save.numpy_item(name, to_numpy(value), code_of(value) if code_of else None) for name, value in tensors.items()]


def save(tensors: Dict[str, Any], metadata: Optional[Dict[str, str]], to_numpy: ToNumpy, kind: str, filename: Any = _save.TO_BYTES, code_of: Any = None) -> Optional[bytes]:
    return _save.write(items(tensors, to_numpy, kind, code_of), metadata, filename)


def convert_each(tensors: Dict[str, Any], convert: Callable[[Any], Any], *, in_place: bool = True) -> Dict[str, Any]:
    """Backs the reference's private `_np2…`/`_…2np` helpers, which code
    imports too: every value converted, in the caller's dict, which is
    returned, as theirs do (`in_place=False`: into a new dict, as mlx's
    `_mx2np` does)."""
    converted = tensors if in_place else {}
    for name, value in tensors.items():
        converted[name] = convert(value)
    return converted


def load(data: bytes, from_numpy: Callable[[Any], Any]) -> Dict[str, Any]:
    return {name: from_numpy(_to_numpy(t["dtype"], t["shape"], t["data"])) for name, t in deserialize(data)}


def load_file(filename: Any, framework: str, device: Any = "cpu", backend: str = "mmap") -> Dict[str, Any]:
    with safe_open(filename, framework=framework, device=device, backend=backend) as f:
        return f.get_tensors()
