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

from ._errors import not_an_instance
from ._tensafe_rust import SafetensorError, parse_size, printable, save_sharded_buffers, serialize_buffers

Item = Tuple[str, str, List[int], Any]


#: `write`'s filename when the caller wants the bytes back (`save`): not
#: None, which a `save_file` caller may pass by mistake.
TO_BYTES: Any = object()


def check_metadata(metadata: Optional[Dict[str, str]]) -> Optional[Dict[str, str]]:
    if metadata is not None and not isinstance(metadata, dict):
        raise not_an_instance("metadata", metadata, "dict")
    return metadata


def path_argument(path: Any, argument: str = "filename") -> Any:
    """`os.fspath(path)`, refusing what is not a path (None included) in
    the reference's words."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"argument '{argument}': expected str, bytes or os.PathLike object, not {type(path).__name__}")
    path = os.fspath(path)
    if isinstance(path, bytes):
        raise not_an_instance(argument, path, "str")
    return path


def write(items: List[Item], metadata: Optional[Dict[str, str]], filename: Any = TO_BYTES) -> Optional[bytes]:
    """Serializes `items` to `filename`, or to bytes when it is `TO_BYTES`.
    A URL (s3://, gs://, az://) is uploaded with the same bytes: one PUT up
    to 8 MiB, else a multipart upload streamed from the buffers, aborted on
    failure (http(s):// is read-only)."""
    check_metadata(metadata)
    return serialize_buffers(items, metadata, None if filename is TO_BYTES else path_argument(filename))


def write_sharded(items: List[Item], directory: Any, max_shard_size: Any, metadata: Optional[Dict[str, str]]) -> Optional[dict]:
    """Writes `items` as shards of at most `max_shard_size` (bytes, or a
    string like "5GB") plus `model.safetensors.index.json` (a URL prefix:
    uploaded, index last); returns the index, or None when one
    `model.safetensors` was enough."""
    check_metadata(metadata)
    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    if limit <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
    return save_sharded_buffers(items, path_argument(directory, "save_directory"), limit, metadata)


def numpy_item(name: str, array: Any, code: Optional[str] = None) -> Item:
    """An item for a numpy array: made contiguous and little-endian if needed
    (the only copies on the save path), then viewed as bytes. `code` overrides
    the dtype read from the array (paddle exports bfloat16 as uint16)."""
    import numpy as np

    from . import _dtypes

    if not isinstance(name, str):
        raise not_an_instance("tensor_dict", name, "str")
    if not isinstance(array, np.ndarray):
        raise SafetensorError(f"Key `{printable(name)}` is invalid, expected numpy.ndarray but received {type(array)}")
    code = code or _dtypes.code_for_numpy(array.dtype)
    byteorder = array.dtype.byteorder
    if byteorder == ">" or (byteorder == "=" and sys.byteorder == "big"):
        array = array.astype(array.dtype.newbyteorder("<"))
    # Non-contiguous arrays (A.T, A[:, ::2]) are saved by their logical values.
    contiguous = np.ascontiguousarray(array)
    return name, code, list(array.shape), contiguous.reshape(-1).view(np.uint8)
