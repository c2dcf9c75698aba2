"""tensafe: safe, fast safetensors.

A drop-in for the `safetensors` Python API (`safe_open`, `serialize`,
`deserialize`, and the framework modules `tensafe.torch`, `tensafe.numpy`,
`tensafe.flax`, `tensafe.tensorflow`, `tensafe.paddle`, `tensafe.mlx`),
implemented in Rust. To run code written for `safetensors` unchanged, see
`tensafe.drop_in`. `convert` and `scan` handle pickle checkpoints without
ever unpickling them.
"""

from ._open import _safe_open_handle, safe_open
from ._pickle import convert, scan
from ._tensafe_rust import (
    SafetensorError,
    TensorSpec,
    __version__,
    deserialize,
    serialize,
    serialize_file,
)

__all__ = [
    "SafetensorError",
    "TensorSpec",
    "convert",
    "scan",
    "__version__",
    "deserialize",
    "safe_open",
    "_safe_open_handle",
    "serialize",
    "serialize_file",
]
