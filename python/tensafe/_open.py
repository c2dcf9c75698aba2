"""`safe_open`: lazy access to the tensors of a file, for every framework."""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import io
import numbers
import operator
import os
import re
import stat
import threading
from typing import Any, Dict, List, Optional, Tuple, Union

from . import _dtypes, _progress
from ._errors import SliceIndexError, SliceValueError, not_an_instance
from ._tensafe_rust import DIRECT_ALIGN, File, HostBuffer, SafetensorError, printable

_FRAMEWORKS = {
    "pt": "pt", "torch": "pt", "pytorch": "pt",
    "np": "numpy", "numpy": "numpy",
    "tf": "tensorflow", "tensorflow": "tensorflow",
    "jax": "flax", "flax": "flax",
    "mlx": "mlx",
    "paddle": "paddle",
}
_ACCELERATORS = ("cuda", "npu", "xpu", "xla", "mlu", "hpu", "musa")
_DEVICE_RE = re.compile(r"^(%s)(?::(\d+))?$" % "|".join(_ACCELERATORS))


def _framework(framework: Any) -> str:
    if not isinstance(framework, str):
        raise not_an_instance("framework", framework, "str")
    try:
        return _FRAMEWORKS[framework]
    except KeyError:
        raise SafetensorError(f"framework {framework} is invalid") from None


def _check_count(what: str, value: Any, at_least: int) -> None:
    """Refuses a count (threads, rank, a dim…) that is not an integer (int,
    numpy integer, integer 0-d tensor: anything with `__index__`; not a bool)
    of at least `at_least`."""
    try:
        valid = not isinstance(value, bool) and operator.index(value) >= at_least
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"{what} must be an integer >= {at_least}, got {value!r}")


def _device(device: Any) -> Union[str, int]:
    """Normalises a device argument the way the reference accepts it, and
    a `torch.device` too (which the reference refuses) by its name."""
    if type(device).__module__ == "torch" and type(device).__name__ == "device":  # no torch import needed
        device = str(device)
    if device is None or device == "cpu":
        return "cpu"
    if isinstance(device, bool):
        raise SafetensorError(f"device {device} is invalid")
    if isinstance(device, int):
        # The reference takes an ordinal as a 64-bit unsigned integer.
        if not 0 <= device < 2**64:
            raise SafetensorError(f"device {device} is invalid")
        return device
    if isinstance(device, str):
        if device in ("mps", "mps:0"):
            return device
        if device.startswith("mps:"):
            raise SafetensorError(f"device {device} is invalid: only mps or mps:0 is supported")
        m = _DEVICE_RE.match(device)
        if m and int(m.group(2) or 0) < 2**64:
            return f"{m.group(1)}:{m.group(2) or 0}"
    # The reference's words: a string as it is, anything else by its repr.
    raise SafetensorError(f"device {device if isinstance(device, str) else repr(device)} is invalid")


def _numpy_bytes(buf: Any) -> Any:
    """A uint8 numpy array over `buf`, without copying."""
    import numpy as np

    return np.frombuffer(buf, dtype=np.uint8) if len(buf) else np.empty(0, dtype=np.uint8)


def _numpy_from_bytes(code: str, shape: List[int], flat: Any) -> Any:
    """Reinterprets a uint8 array holding one tensor (a view, no copy)."""
    dtype = _dtypes.numpy_dtype(code)
    shape = _dtypes.packed_shape(code, shape) if code == "F4" else shape
    return flat.view(dtype).reshape(shape)


def _to_numpy(code: str, shape: List[int], buf: Any) -> Any:
    return _numpy_from_bytes(code, shape, _numpy_bytes(buf))


def _torch_bytes(buf: Any) -> Any:
    """A uint8 torch tensor over `buf`, without copying (except immutable bytes:
    torch tensors are always writable, so they never alias a caller's bytes)."""
    import torch

    if isinstance(buf, memoryview) and buf.readonly:
        buf = bytearray(buf)
    if len(buf) == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(buf, dtype=torch.uint8)


def _torch_empty(shape: List[int], dtype: Any, device: Any = None) -> Any:
    """A torch tensor of no elements: reshaped, as torch.empty(shape)
    computes contiguous strides, which overflow for a 0 beside dimensions
    that multiply past 64 bits (the reference gives such tensors)."""
    import torch

    return torch.empty(0, dtype=dtype, device=device).reshape(shape)


def _torch_from_bytes(code: str, shape: List[int], flat: Any) -> Any:
    """Reinterprets a uint8 tensor holding one tensor (a view when aligned)."""
    dtype = _dtypes.torch_dtype(code)
    shape = _dtypes.packed_shape(code, shape)
    if flat.numel() == 0:
        return _torch_empty(shape, dtype, flat.device)
    try:
        return flat.view(dtype).reshape(shape)
    except RuntimeError:
        # Other writers may leave a tensor unaligned for its element size.
        return flat.clone().view(dtype).reshape(shape)


def _to_torch(code: str, shape: List[int], buf: Any, device: Union[str, int]) -> Any:
    tensor = _torch_from_bytes(code, shape, _torch_bytes(buf))
    return tensor if device == "cpu" else tensor.to(device)


def _wrap(framework: str, device: Union[str, int], array: Any) -> Any:
    """Turns a numpy array into the framework's tensor type."""
    if framework == "numpy":
        return array
    if framework == "flax":
        import jax.numpy as jnp

        return jnp.asarray(array)
    if framework == "tensorflow":
        import tensorflow as tf

        return tf.convert_to_tensor(array)
    if framework == "mlx":
        import mlx.core as mx

        try:
            return mx.array(array)
        except RuntimeError as e:  # mlx has no float8 types, and says only "std::bad_cast"
            raise SafetensorError(f"mlx has no {array.dtype.name} type to load this tensor into ({e})") from e
    if framework == "paddle":
        from .paddle import from_numpy, place_of

        return from_numpy(array, place_of(device))
    raise SafetensorError(f"framework {framework} is invalid")


def _is_cuda(device: Union[str, int]) -> bool:
    """Whether torch would put tensors for `device` on a CUDA GPU (ints are CUDA indices)."""
    return isinstance(device, int) or str(device).startswith("cuda")


def _read_all(file: File, threads: Optional[int], progress: Any) -> memoryview:
    """Reads a file's whole data section (pread, remote, or mapped: from the
    file) into one fresh allocation (huge pages where the kernel offers
    them) with the parallel I/O engine; the memoryview keeps the allocation
    alive. The data starts
    at the same offset within a 4 KiB page as in the file, so that cold
    reads can go straight from the disk into it (O_DIRECT)."""
    shift = file.data_start % DIRECT_ALIGN
    data = memoryview(HostBuffer(shift + file.data_len))[shift : shift + file.data_len]
    if file.data_len:
        file.read_all_into(data, threads=threads, progress=progress)
    elif progress is not None:
        progress(0, 0)  # nothing to read: done at once, as a mapped file's
    return data


#: Selections from this size up are placed in `_read_selections`' buffer
#: aligned like the file, so that their cold reads can go past the page cache.
_DIRECT_MIN_BYTES = 1 << 20


def _read_selections(file: File, selections: List[Tuple[str, Any]], threads: Optional[int] = None) -> Dict[str, Any]:
    """torch tensors of the selections `[(name, index)]` (basic indices) of a
    local file's tensors, read in parallel by the I/O engine into one fresh
    allocation, one after the other; each tensor has a storage of its own
    over its bytes, as bulk loads' (`_Cutter`)."""
    placed, size = [], 0
    for name, index in selections:
        shape, nbytes, first = file.slice_layout(name, index)
        size += (first - size) % DIRECT_ALIGN if nbytes >= _DIRECT_MIN_BYTES else -size % 64
        placed.append((name, index, size, shape, nbytes))
        size += nbytes
    buffer = HostBuffer(size)
    file.read_slices_into([(name, index, at) for name, index, at, _, _ in placed], buffer, threads=threads)
    cutter = _Cutter("pt", memoryview(buffer))
    return {name: cutter.cut(file.info(name)[0], shape, at, at + nbytes) for name, _, at, shape, nbytes in placed}


_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False


@contextlib.contextmanager
def _gc_paused():
    """Pauses the cyclic garbage collector while many tensors are created
    (not while bytes are read: the pause is process-wide).

    Building 50k tensors allocates hundreds of thousands of objects, each batch
    of which triggers a collection that walks every live object (torch alone
    has many); pausing halves the time of such loads. Reentrant and
    thread-safe: the collector is re-enabled when the last pause ends.
    """
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


def _gc_after_fork() -> None:
    """In a child forked while another thread held a pause: the pauses were
    that thread's, which the child does not have, so none holds there."""
    global _gc_lock, _gc_pauses
    _gc_lock = threading.Lock()  # may have been held by that thread
    if _gc_pauses:
        _gc_pauses = 0
        if _gc_was_enabled:
            gc.enable()


os.register_at_fork(after_in_child=_gc_after_fork)


class _Cutter:
    """Makes tensors out of one buffer holding a file's data section.

    torch on the CPU: each tensor gets a storage of its own over exactly its
    bytes (`torch.frombuffer` with an offset), as the reference's tensors do,
    so `torch.save`, storage sizes and shared-tensor checks see one tensor and
    not the whole file. On a device: views of the one device allocation.
    numpy: slices of one uint8 array, viewed as the dtype (per dtype once).
    A few microseconds per tensor, which matters for files of 50k tensors.
    """

    def __init__(self, framework: str, data: Any):
        self.torch = framework == "pt"
        self.device_base = data if self.torch and hasattr(data, "device") else None
        if self.device_base is None:
            if self.torch and isinstance(data, memoryview) and data.readonly:
                # torch tensors are always writable: never alias a caller's immutable bytes.
                data = bytearray(data)
            self.buffer = data
            self.array = None if self.torch else _numpy_bytes(data)
        self.dtypes: Dict[str, Any] = {}

    def cut(self, code: str, shape: List[int], begin: int, end: int) -> Any:
        if self.device_base is not None:
            return _torch_from_bytes(code, shape, self.device_base[begin:end])
        if not self.torch:
            return _numpy_from_bytes(code, shape, self.array[begin:end])
        dtype = self.dtypes.get(code)
        if dtype is None:
            dtype = self.dtypes[code] = _dtypes.torch_dtype(code)
        if code == "F4":
            shape = _dtypes.packed_shape(code, shape)
        if end == begin:
            return _torch_empty(shape, dtype)
        flat = _frombuffer(self.buffer, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin)
        # Already 1-D: skip the reshape (a microsecond per tensor).
        return flat if len(shape) == 1 else flat.view(shape)


def _frombuffer(*args: Any, **kwargs: Any) -> Any:
    """torch.frombuffer, imported on first use (tensafe does not need torch)."""
    global _frombuffer
    import torch

    _frombuffer = torch.frombuffer
    return torch.frombuffer(*args, **kwargs)


def _bulk(file: File, framework: str, device: Union[str, int], threads: Optional[int] = None, progress: Any = None, drop_cache: bool = False) -> Dict[str, Any]:
    """Every tensor of a file, cut out of one buffer: the mapping itself
    (mmap, torch and the frameworks that copy out of numpy), or one
    allocation filled by parallel reads (pread, and numpy's private copies)."""
    # Checked whatever the backend, so that a bad value is not found only
    # once the same call runs on another backend.
    if threads is not None:
        _check_count("threads", threads, 1)
        # No more readers start than there are reads: a count past any
        # machine's means as many as can be used (and fits the engine's int).
        threads = min(operator.index(threads), _MAX_THREADS)
    progress = _progress.resolve(progress, "loading ")
    to_other_device = framework == "pt" and device != "cpu"
    read_into_memory = file.backend not in _IN_MEMORY or _copies_out_of_the_mapping(file, framework)
    if framework == "pt" and _is_cuda(device):
        # Straight to the device through pinned staging buffers; the tensors
        # are views of one device allocation.
        from ._pipeline import load_data_section

        data = load_data_section(file, device, threads=threads, progress=progress)
    elif read_into_memory:
        data = _read_all(file, threads, progress)
    else:
        # The mapping itself: tensors read the page cache, which a background
        # thread fills ahead of their first touch where they stay mapped
        # (every tensor is wanted; a copy to another device reads it all at
        # once, and `drop_cache` may then drop the cache).
        if not to_other_device:
            file.prefetch()
        data = file.data_buffer()
        if progress is not None:
            progress(file.data_len, file.data_len)  # nothing to read: done at once
    if to_other_device and not hasattr(data, "device"):
        # Other accelerators: one host-to-device copy, tensors are views of it.
        data = _torch_bytes(data).to(device)
    # Read into memory or copied to a device, the bytes are in their final
    # place: the page cache's copy is not needed.
    if drop_cache and (read_into_memory or hasattr(data, "device")):
        file.drop_cache()
    with _gc_paused():
        return _cut_all(file, framework, device, data)


def _copies_out_of_the_mapping(file: File, framework: str) -> bool:
    """Whether tensors of a mapped file are copies rather than views of it:
    numpy arrays are, as the reference's are (a numpy user does not expect an
    array that changes, or kills the process with SIGBUS, when the file is
    rewritten or cut short). torch tensors are views, as the reference's; the
    other frameworks copy out of numpy themselves."""
    return framework == "numpy" and file.backend == "mmap"


def _cut_all(file: File, framework: str, device: Union[str, int], data: Any) -> Dict[str, Any]:
    """Every tensor of `file`, cut out of `data` (its data section)."""
    cutter = _Cutter(framework, data)
    out: Dict[str, Any] = {}
    for code, shape, begin, each, names in file.runs():
        if framework != "pt" and len(names) > 1 and shape:
            # Same dtype and shape, back to back: one view, split along a new axis.
            out.update(zip(names, cutter.cut(code, [len(names), *shape], begin, begin + len(names) * each)))
        else:
            for k, name in enumerate(names):
                out[name] = cutter.cut(code, shape, begin + k * each, begin + (k + 1) * each)
    if framework not in ("pt", "numpy"):
        out = {name: _wrap(framework, device, array) for name, array in out.items()}
    return out


def _convert(framework: str, device: Union[str, int], code: str, shape: List[int], buf: Any) -> Any:
    """Builds a framework tensor over `buf` (zero-copy where the framework allows)."""
    if framework == "pt":
        return _to_torch(code, shape, buf, device)
    return _wrap(framework, device, _to_numpy(code, shape, buf))


#: The most reader threads a bulk load starts, whatever `threads` asks.
_MAX_THREADS = 1024

#: The smallest tensor that `get_tensor` reads ahead in the background
#: (`File.prefetch_range`); the page faults' own readahead covers smaller ones.
_PREFETCH_MIN_BYTES = 1 << 20

#: File backends whose bytes are addressable memory (the others are read: pread, remote).
_IN_MEMORY = ("mmap", "memory")

def _is_checkpoint(name: str) -> bool:
    """A directory (local, or a remote URL ending in `/`) or an index file
    (locally: named `*.json` and not a safetensors file)."""
    if File.is_remote(name):
        return name.endswith(("/", ".json"))
    return File.is_checkpoint(name)


_NUMPY_LIKE = {"numpy": "numpy", "tensorflow": "tensorflow", "flax": "flax", "mlx": "mlx"}


def _check_arguments(framework: Any, device: Any, backend: Any) -> tuple:
    """Validates `safe_open`'s arguments in the reference's order and wording;
    returns the normalised framework and device."""
    name, normalised = _framework(framework), _device(device)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in ("mmap", "pread", "auto"):
        raise SafetensorError(f'backend "{backend}" is invalid (expected one of: "mmap", "pread", "auto")')
    return name, normalised


def _check_device_supported(framework: str, device: Union[str, int]) -> None:
    """Frameworks that go through numpy load to the CPU only. Checked once
    the file is open, as the reference does (a missing file is reported first)."""
    if framework in _NUMPY_LIKE and device != "cpu":
        raise SafetensorError(f"Device {device} is not supported for framework {_NUMPY_LIKE[framework]}")


class safe_open:
    """Opens a safetensors file for lazy reads: `with safe_open(path, "pt") as f: f.get_tensor(name)`.

    `backend="mmap"` (default) maps the file copy-on-write: tensors are zero-copy
    views and nothing is read before it is touched. Writing into a returned
    tensor never reaches the file, but is visible to later `get_tensor` calls
    on the same handle (as with the reference). numpy arrays are copies, as
    the reference's are. `backend="pread"` reads each
    tensor into private memory with positional reads, the better choice on
    network and FUSE filesystems; `backend="auto"` picks `pread` there and
    `mmap` elsewhere.
    """

    def __new__(cls, filename: Any, *args: Any, **kwargs: Any) -> "safe_open":
        # A checkpoint directory or index opens every shard as one checkpoint.
        if cls is safe_open and isinstance(filename, (str, os.PathLike)):
            if _is_checkpoint(os.fspath(filename)):
                return super().__new__(_CheckpointOpen)
        return super().__new__(cls)

    def __init__(self, filename: Union[str, "os.PathLike[str]"], framework: str, device: Any = "cpu", *, backend: str = "mmap"):
        self._framework, self._device = _check_arguments(framework, device, backend)
        self._file: Optional[File] = _open_source(filename, backend)
        _check_device_supported(self._framework, self._device)
        # Makes tensors out of the data section (in-memory backends), on first use.
        self._cutter: Optional[_Cutter] = None

    @classmethod
    def _of_file(cls, file: File, framework: str, device: Union[str, int]) -> "safe_open":
        """A handle on an already opened file (the shards of a checkpoint)."""
        handle = object.__new__(cls)
        handle._framework, handle._device, handle._file, handle._cutter = framework, device, file, None
        return handle

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> "safe_open":
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        # Tensors already handed out keep the mapping alive on their own.
        self._file = None
        self._cutter = None

    def _open(self) -> File:
        if self._file is None:
            raise SafetensorError("File is closed")
        return self._file

    def _parts(self) -> List["safe_open"]:
        """The open files (one here; a checkpoint's shards in `_CheckpointOpen`)."""
        self._open()
        return [self]

    # -- header ------------------------------------------------------------
    def keys(self) -> List[str]:
        """Tensor names, sorted."""
        return self._open().keys()

    def offset_keys(self) -> List[str]:
        """Tensor names in file order."""
        return self._open().offset_keys()

    def metadata(self) -> Optional[Dict[str, str]]:
        """The `__metadata__` map, or None."""
        return self._open().metadata()

    # -- tensors -----------------------------------------------------------
    def get_tensor(self, name: str) -> Any:
        file = self._open()
        code, shape, begin, end = _info(file, name)
        if file.backend in _IN_MEMORY and self._framework in ("pt", "numpy"):
            tensor = self._in_memory(file, code, shape, begin, end)
            if _copies_out_of_the_mapping(file, self._framework):
                return tensor.copy()
            if self._device != "cpu":
                return tensor.to(self._device)
            if end - begin >= _PREFETCH_MIN_BYTES:
                file.prefetch_range(begin, end - begin)  # ahead of its first touch, as `prefetch`
            return tensor
        return _convert(self._framework, self._device, code, shape, file.buffer(name))

    def _in_memory(self, file: File, code: str, shape: List[int], begin: int, end: int) -> Any:
        """A tensor of a mapped or in-memory file, cut out of its data
        section in place (per handle, one buffer and typed views per dtype)."""
        # Read once: another thread may close the handle (and drop it) meanwhile.
        cutter = self._cutter
        if cutter is None:
            cutter = self._cutter = _Cutter(self._framework, file.data_buffer())
        return cutter.cut(code, shape, begin, end)

    def get_tensors(self, *, threads: Optional[int] = None, progress: Any = None, drop_cache: bool = False) -> Dict[str, Any]:
        """Every tensor, in file order.

        With `backend="mmap"` torch tensors are lazy views of the mapping, and
        on Linux a background thread reads the file into the page cache ahead
        of their first touch (if it fits in memory); numpy arrays are copies,
        read as with `backend="pread"`. With
        `backend="pread"` the whole file is read into one allocation by
        `threads` parallel readers (default 4), calling `progress(done, total)`
        as bytes arrive (`progress=True`: a progress bar on stderr);
        `drop_cache=True` then evicts the file from the page cache so the
        model is not held twice in RAM. On CUDA devices the bytes go through
        a bounded set of pinned staging buffers straight to one device
        allocation, and `progress` is called every 64 MiB and at the end.
        """
        return _bulk(self._open(), self._framework, self._device, threads, progress, drop_cache)

    def get_slice(self, name: str) -> "PySafeSlice":
        file = self._open()
        code, shape, begin, end = _info(file, name)
        whole = None
        if file.backend == "mmap" and self._framework == "pt":
            whole = functools.partial(self._in_memory, file, code, shape, begin, end)
        return PySafeSlice(file, name, code, shape, self._framework, self._device, begin, whole)


# `inspect.signature(safe_open)` would describe `__new__`, which takes
# anything (it only picks the class): callers that look there for `backend`,
# as some do before passing it, must find `__init__`'s parameters.
safe_open.__signature__ = inspect.Signature(list(inspect.signature(safe_open.__init__).parameters.values())[1:])


class _CheckpointOpen(safe_open):
    """`safe_open` on a sharded checkpoint (a directory or its index): the
    shards behave as one file. The index and shards are checked for agreement
    first (missing shard, misplaced or missing tensor, wrong total size)."""

    def __init__(self, filename: Any, framework: str, device: Any = "cpu", *, backend: str = "mmap"):
        framework, device = _check_arguments(framework, device, backend)
        files = File.open_checkpoint(os.fspath(filename), backend)
        _check_device_supported(framework, device)
        self._shards: Optional[List[safe_open]] = [safe_open._of_file(f, framework, device) for f in files]
        self._where = {name: shard for shard in self._shards for name in shard.offset_keys()}

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        for shard in self._shards or []:
            shard.__exit__(exc_type, exc_value, traceback)
        self._shards = None

    def _parts(self) -> List[safe_open]:
        """The shards, in index order."""
        if self._shards is None:
            raise SafetensorError("File is closed")
        return self._shards

    def _shard(self, name: str) -> safe_open:
        self._parts()
        if not isinstance(name, str):
            raise not_an_instance("name", name, "str")
        try:
            return self._where[name]
        except KeyError:
            raise SafetensorError(f"File does not contain tensor {printable(name)}") from None

    def keys(self) -> List[str]:
        self._parts()
        return sorted(self._where)

    def offset_keys(self) -> List[str]:
        """Tensor names in shard order, then file order."""
        return [name for shard in self._parts() for name in shard.offset_keys()]

    def metadata(self) -> Optional[Dict[str, str]]:
        """The first shard's `__metadata__` (shards written together share it);
        `None` for an index that lists no tensor, hence no shard."""
        shards = self._parts()
        return shards[0].metadata() if shards else None

    def get_tensor(self, name: str) -> Any:
        return self._shard(name).get_tensor(name)

    def get_slice(self, name: str) -> "PySafeSlice":
        return self._shard(name).get_slice(name)

    def get_tensors(self, *, threads: Optional[int] = None, progress: Any = None, drop_cache: bool = False) -> Dict[str, Any]:
        """Every tensor of every shard; `progress(done, total)` counts the
        whole checkpoint (one bar for `progress=True`)."""
        whole = _progress.resolve(progress, "loading ")
        shards = self._parts()
        sizes = [shard._open().data_len for shard in shards]
        total = sum(sizes)
        out: Dict[str, Any] = {}
        before, reported = 0, [0]

        def report(done: int) -> None:
            reported[0] = done
            whole(done, total)

        for shard, size in zip(shards, sizes):
            part = None if whole is None else (lambda done, _, before=before: report(before + done))
            out.update(shard.get_tensors(threads=threads, progress=part, drop_cache=drop_cache))
            before += size
            if whole is not None and reported[0] < before:
                report(before)  # a shard that reports nothing (mapped, not read)
        return out


class PySafeSlice:
    """A tensor not yet read: `get_shape()`, `get_dtype()` and numpy-style
    `[...]`, which reads only the selected bytes or (torch, mapped files)
    makes a view of them.

    With torch and `backend="mmap"`, every index is torch's, applied to the
    whole tensor, a view of the mapping: basic indices give views of it
    (writing into one is seen by the handle's later reads, never by the
    file), as the reference's do. Otherwise ints, slices with positive
    steps, `None` and one `...` are read natively (only the selected bytes);
    with torch, any other index — index lists, arrays and tensors, boolean
    masks, booleans, several ellipses — is applied by torch to the whole
    tensor, as the reference's default torch path does for every index.
    With paddle, such indices and negative steps are paddle's, applied to
    the whole tensor, as the reference does. The native reader keeps the
    reference's restricted rules for the other frameworks.
    """

    def __init__(self, file: File, name: str, code: str, shape: List[int], framework: str, device: Any, begin: int = 0, whole: Any = None):
        self._file, self._name, self._code, self._shape = file, name, code, shape
        self._framework, self._device = framework, device
        # Where the tensor starts in the data section, and (a mapped file,
        # torch) what makes the whole tensor as a view of the mapping.
        self._begin, self._whole = begin, whole
        # Packed sub-byte values (F4): a byte holds several elements, so only
        # the native reader, which counts elements, may index them.
        self._packed = _dtypes.BY_CODE[code][0] < 8

    def get_shape(self) -> List[int]:
        return list(self._shape)

    def get_dtype(self) -> str:
        return self._code

    def __getitem__(self, index: Any) -> Any:
        # torch checks a lone slice's step before the rank of a 0-d tensor
        # (`[::0]` is a ValueError there): such an index is torch's too.
        torch_checks_first = not self._shape and isinstance(index, slice)
        # A mapped file: the whole tensor is a view of the mapping, and
        # torch's basic indexing of it a view too, as the reference's (no
        # copy: transformers loads every weight as `get_slice(name)[...]`).
        mapped = self._whole is not None and not self._packed
        native = not torch_checks_first and _natively_sliced(index)
        if self._framework == "pt" and (mapped or not native):
            if native and index is not Ellipsis:
                # The native checks and words first (no read), then bounds
                # past 64 bits clamped, which torch would get wrong.
                self._file.slice_layout(self._name, index)
                index = _within_int64(index, max(self._shape, default=1))
            whole = self._whole() if mapped else _convert("pt", "cpu", self._code, self._shape, self._whole_bytes())
            selected = whole[index]
            if self._device != "cpu":
                return selected.to(self._device)
            if selected.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr():  # a view
                if self._file.backend == "memory":
                    return selected.clone()  # never one of the caller's buffer
                if mapped:
                    self._read_ahead(selected)
            return selected
        if self._framework == "paddle" and not _natively_sliced_as_paddle(index):
            return self._whole_in_paddle()[index]
        try:
            shape, data = self._file.read_slice(self._name, index, torch_order=self._framework == "pt")
        except (SliceIndexError, SliceValueError):
            if self._framework != "paddle" or self._packed:
                raise
            return self._whole_in_paddle()[index]  # paddle's own error, as the reference's
        return _convert(self._framework, self._device, self._code, shape, data)

    def _read_ahead(self, view: Any) -> None:
        """A view of the tensor's mapping holding 1 MiB or more: the bytes it
        spans are read into the page cache in the background, ahead of its
        first touch, as `get_tensor` does for its tensor."""
        if view.numel() * view.element_size() < _PREFETCH_MIN_BYTES:
            return  # too little to be worth a request (a column of a matrix spans it all)
        first = view.storage_offset() * view.element_size()
        last = first + (1 + sum((n - 1) * step for n, step in zip(view.shape, view.stride()))) * view.element_size()
        self._file.prefetch_range(self._begin + first, last - first)

    def _whole_bytes(self) -> Any:
        """The whole tensor's bytes, for a framework's own indexing: refused
        for packed sub-byte dtypes, whose bytes hold several elements (the
        framework would index bytes where a slice counts elements)."""
        if self._packed:
            raise SliceIndexError(f"{self._code} tensors (packed sub-byte values) take only ints, slices, None and one ... as indices")
        return self._file.buffer(self._name)

    def _whole_in_paddle(self) -> Any:
        """The whole tensor in paddle: the reference indexes paddle tensors with
        paddle's own rules (booleans as masks, negative steps, index lists)."""
        return _convert("paddle", self._device, self._code, self._shape, self._whole_bytes())


def _within_int64(index: Any, longest: int) -> Any:
    """`index` (a native one) with each slice's start and stop clamped to
    ±2^62 and its step to `longest` (the tensor's longest dimension, at
    least 1), which selects the same and which torch computes right (it
    truncates bounds past 64 bits, and a huge step overflows its length or
    strides)."""
    def clamp(bound: Any, limit: int) -> Any:
        return None if bound is None else max(-limit, min(operator.index(bound), limit))

    def within(item: Any) -> Any:
        if not isinstance(item, slice):
            return item
        return slice(clamp(item.start, 2**62), clamp(item.stop, 2**62), clamp(item.step, max(longest, 1)))

    return tuple(within(item) for item in index) if isinstance(index, tuple) else within(index)


def _natively_sliced_as_paddle(index: Any) -> bool:
    """Whether the native reader gives what paddle's indexing gives: the
    native forms without a slice of negative or zero step."""
    items = index if isinstance(index, tuple) else (index,)
    steps = [item.step for item in items if isinstance(item, slice) and item.step is not None]
    return _natively_sliced(index) and all(isinstance(step, numbers.Integral) and step > 0 for step in steps)


def _info(file: File, name: Any) -> Tuple[str, List[int], int, int]:
    """`file.info(name)`, a name that is not a str refused in the reference's words."""
    try:
        return file.info(name)
    except TypeError:
        raise not_an_instance("name", name, "str") from None


def _natively_sliced(index: Any) -> bool:
    """Whether the native reader takes `index`: ints (not booleans; numpy
    integer scalars and 0-d integer arrays and tensors count, but not 0-d
    uint8 ones, which torch takes as masks), slices, `None`, at most one
    `...`, in a tuple or alone, or the empty list."""
    if isinstance(index, list):
        return not index
    items = index if isinstance(index, tuple) else (index,)
    ellipses = 0
    for item in items:
        if item is Ellipsis:
            ellipses += 1
        elif item is None or isinstance(item, slice):
            continue
        elif isinstance(item, bool) or not hasattr(item, "__index__"):
            return False
        # numpy's `bool`, torch's `torch.bool`, paddle's `paddle.bool`.
        dtype = str(getattr(item, "dtype", "")).rsplit(".", 1)[-1]
        if getattr(item, "ndim", 0) != 0 or dtype == "bool":
            return False  # arrays, tensors and booleans are the framework's
        if dtype == "uint8" and not isinstance(item, numbers.Integral):
            return False  # 0-d uint8 arrays and tensors: masks to torch (numpy's uint8 scalars are ints)
    return ellipses <= 1


def _open_source(source: Any, backend: str) -> File:
    """A path, a bytes-like object holding a whole file, or a file object."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        try:
            return File.from_bytes(source)
        except SafetensorError as error:
            path = _as_path(source)
            if path is None:
                raise
            raise SafetensorError(f"{error}; the bytes given are the path {path!r}, not a file's contents: pass it as a str to open the file") from None
    if isinstance(source, (str, os.PathLike)):
        return File(os.fspath(source), backend)
    if hasattr(source, "read"):
        return _open_file_object(source, backend)
    raise TypeError(f"argument 'filename': expected a path, a bytes-like object or a file object, got {type(source).__name__}")


def _open_file_object(source: Any, backend: str) -> File:
    """An OS file object (`open(...)`, any mode) is the regular file it has
    open, read in place (not by its name, which may since name another
    file), or, once closed, the file its name names. Anything else (archive
    members, decompressing streams, pipes) is read with `read()`."""
    raw = getattr(source, "buffer", source)  # text mode
    raw = getattr(raw, "raw", raw)  # buffered
    name = getattr(source, "name", None)
    path = os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else None
    if isinstance(raw, io.FileIO) and raw.closed and path is not None:
        return File(path, backend)
    if isinstance(raw, io.FileIO) and not raw.closed and stat.S_ISREG(os.fstat(raw.fileno()).st_mode):
        if raw.writable():
            source.flush()  # what the caller wrote is part of the file
        return File.from_fd(raw.fileno(), path or f"<file descriptor {raw.fileno()}>", backend)
    return File.from_bytes(source.read())


def _as_path(data: Any) -> Optional[str]:
    """`data` as a path when it is one (a short byte string naming a file
    that exists, or ending like a safetensors or index file): what a caller
    who passed a path as bytes meant."""
    if len(data) > 4096:
        return None
    raw = bytes(data)
    if b"\0" in raw:
        return None
    path = os.fsdecode(raw)
    return path if os.path.exists(path) or path.endswith((".safetensors", ".json")) else None


class _NotAFileObject(TypeError, AttributeError):
    """`_safe_open_handle` of something without `fileno()`: a TypeError, and
    an AttributeError as the reference raises (callers may catch either)."""


def _safe_open_handle(f: Any, framework: str, device: Any = "cpu", *, backend: str = "mmap") -> safe_open:
    """Like `safe_open`, from an open file object: the file it has open, or
    the sharded checkpoint when it is an index."""
    if not hasattr(f, "fileno"):
        raise _NotAFileObject(f"expected a file object with a fileno() method, got {type(f).__name__}")
    name = getattr(f, "name", None)
    if isinstance(name, (str, os.PathLike)) and _is_checkpoint(os.fspath(name)):
        return safe_open(name, framework, device, backend=backend)
    return safe_open(f, framework, device, backend=backend)
