"""The common end of every framework's save path.

Each framework module turns its tensors into `(name, code, shape, array)`
where `array` is a C-contiguous little-endian numpy uint8 view of the tensor's
memory (no copy). The compiled serializer reads those buffers in place, with
the GIL released.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from ._tensafe_rust import SafetensorError, parse_size, printable, save_sharded_buffers, serialize_buffers

Item = Tuple[str, str, List[int], Any]


def check_metadata(metadata: Optional[Dict[str, str]]) -> Optional[Dict[str, str]]:
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict of str to str, got {type(metadata)}")
    return metadata


def write(items: List[Item], metadata: Optional[Dict[str, str]], filename: Any = None) -> Optional[bytes]:
    """Serializes `items` to `filename`, or to bytes when it is None. A URL
    (s3://, gs://, az://) is uploaded with the same bytes: one PUT up to
    8 MiB, else a multipart upload streamed from the buffers, aborted on
    failure (http(s):// is read-only)."""
    check_metadata(metadata)
    if filename is not None:
        filename = os.fspath(filename)
    return serialize_buffers(items, metadata, filename)


def write_sharded(items: List[Item], directory: Any, max_shard_size: Any, metadata: Optional[Dict[str, str]]) -> Optional[dict]:
    """Writes `items` as shards of at most `max_shard_size` (bytes, or a
    string like "5GB") plus `model.safetensors.index.json` (a URL prefix:
    uploaded, index last); returns the index, or None when one
    `model.safetensors` was enough."""
    check_metadata(metadata)
    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    if limit <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
    return save_sharded_buffers(items, os.fspath(directory), limit, metadata)


def numpy_item(name: str, array: Any, code: Optional[str] = None) -> Item:
    """An item for a numpy array: made contiguous and little-endian if needed
    (the only copies on the save path), then viewed as bytes. `code` overrides
    the dtype read from the array (paddle exports bfloat16 as uint16)."""
    import numpy as np

    from . import _dtypes

    if not isinstance(name, str):
        raise TypeError(f"tensor names must be str, got {type(name)}")
    if not isinstance(array, np.ndarray):
        raise SafetensorError(f"Key `{printable(name)}` is invalid, expected numpy.ndarray but received {type(array)}")
    code = code or _dtypes.code_for_numpy(array.dtype)
    byteorder = array.dtype.byteorder
    if byteorder == ">" or (byteorder == "=" and sys.byteorder == "big"):
        array = array.astype(array.dtype.newbyteorder("<"))
    # Non-contiguous arrays (A.T, A[:, ::2]) are saved by their logical values.
    contiguous = np.ascontiguousarray(array)
    return name, code, list(array.shape), contiguous.reshape(-1).view(np.uint8)
