"""Shared body of the frameworks that save through numpy (flax, tensorflow, mlx, paddle)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from . import _save
from ._open import _to_numpy, safe_open
from ._tensafe_rust import deserialize


def items(tensors: Dict[str, Any], to_numpy: Callable[[Any], Any], kind: str) -> list:
    """Converts values with `to_numpy` into a new list; the caller's dict is left alone
    (the reference's flax and tensorflow modules overwrite it)."""
    if not isinstance(tensors, dict):
        raise ValueError(f"Expected a dict of [str, {kind}] but received {type(tensors)}")
    return [_save.numpy_item(name, to_numpy(value)) for name, value in tensors.items()]


def save(tensors: Dict[str, Any], metadata: Optional[Dict[str, str]], to_numpy: Callable[[Any], Any], kind: str, filename: Any = None) -> Optional[bytes]:
    return _save.write(items(tensors, to_numpy, kind), metadata, filename)


def load(data: bytes, from_numpy: Callable[[Any], Any]) -> Dict[str, Any]:
    return {name: from_numpy(_to_numpy(t["dtype"], t["shape"], t["data"])) for name, t in deserialize(data)}


def load_file(filename: Any, framework: str, device: Any = "cpu", backend: str = "mmap") -> Dict[str, Any]:
    with safe_open(filename, framework=framework, device=device, backend=backend) as f:
        return f.get_tensors()
