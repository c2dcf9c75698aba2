"""torch: the `safetensors.torch` API on tensafe.

Saving reads tensor memory in place (a uint8 numpy view of each CPU tensor, no
copy); loading is lazy and zero-copy from a copy-on-write mapping by default.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Dict, List, NamedTuple, Optional, Set, Tuple, Union

import torch

from . import _dtypes, _save
from ._open import _check_count, _read_selections, _to_torch, safe_open
from ._tensafe_rust import TensorParallelPlan, TensorSpec, deserialize, serialize, serialize_file  # noqa: F401  (the reference's module has them)
from ._tensafe_rust import printable

#: torch dtype -> element size in bytes (F4 counts its packed byte), as the reference exposes it.
_SIZE: Dict[Any, int] = {}
#: header code -> torch dtype, for the dtypes this torch has.
_TYPES: Dict[str, Any] = {}
for _code, (_bits, _name) in _dtypes.BY_CODE.items():
    _dt = getattr(torch, _name, None) if _name else None
    if _dt is not None:
        _TYPES[_code] = _dt
        _SIZE[_dt] = max(_bits // 8, 1)


def _getdtype(dtype_str: str) -> Any:
    return _TYPES[dtype_str]


# The reference module's names for the optional torch dtypes (None where this torch lacks one).
_float8_e4m3fn = getattr(torch, "float8_e4m3fn", None)
_float8_e4m3fnuz = getattr(torch, "float8_e4m3fnuz", None)
_float8_e5m2 = getattr(torch, "float8_e5m2", None)
_float8_e5m2fnuz = getattr(torch, "float8_e5m2fnuz", None)
_float8_e8m0 = getattr(torch, "float8_e8m0fnu", None)
_float4_e2m1_x2 = getattr(torch, "float4_e2m1fn_x2", None)


# -- shared storage helpers (same results as the reference's) ---------------

def storage_ptr(tensor: torch.Tensor) -> int:
    """Address of the tensor's storage (0 for meta tensors)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except Exception:
        try:
            return tensor.storage().data_ptr()
        except NotImplementedError:
            return 0


def storage_size(tensor: torch.Tensor) -> int:
    """Size in bytes of the tensor's storage."""
    try:
        return tensor.untyped_storage().nbytes()
    except AttributeError:
        try:
            return tensor.storage().size() * _SIZE[tensor.dtype]
        except NotImplementedError:
            return tensor.nelement() * _SIZE[tensor.dtype]


def _end_ptr(tensor: torch.Tensor) -> int:
    if tensor.nelement():
        return tensor.view(-1)[-1].data_ptr() + _SIZE[tensor.dtype]
    return tensor.data_ptr()


def _filter_shared_not_shared(tensors: List[Set[str]], state_dict: Dict[str, torch.Tensor]) -> List[Set[str]]:
    """Splits each storage group into clusters of overlapping byte ranges.

    A cluster ends where a tensor starts past the end of every tensor before
    it. (The reference compares with the previous tensor's end only, so a
    view inside a larger tensor but after a smaller view of it, as `C` in
    `x, x[10:20], x[30:40]`, falls into a cluster of its own, and
    `save_model` refuses a module holding them.)"""
    result: List[Set[str]] = []
    for group in tensors:
        if len(group) < 2:
            result.append(group)
            continue
        members = sorted((state_dict[n].data_ptr(), _end_ptr(state_dict[n]), n) for n in group)
        cluster: Set[str] = {members[0][2]}
        cluster_end = members[0][1]
        for start, end, name in members[1:]:
            if start >= cluster_end:
                result.append(cluster)
                cluster = {name}
            else:
                cluster.add(name)
            cluster_end = max(cluster_end, end)
        result.append(cluster)
    return result


def _find_shared_tensors(state_dict: Dict[str, torch.Tensor]) -> List[Set[str]]:
    """Groups tensor names by the storage they share."""
    groups: Dict[Tuple[Any, int, int], Set[str]] = defaultdict(set)
    for name, tensor in state_dict.items():
        if tensor.device != torch.device("meta") and storage_ptr(tensor) != 0 and storage_size(tensor) != 0:
            groups[(tensor.device, storage_ptr(tensor), storage_size(tensor))].add(name)
    return _filter_shared_not_shared(list(groups.values()), state_dict)


def _is_complete(tensor: torch.Tensor) -> bool:
    """Whether the tensor covers its whole storage."""
    return tensor.data_ptr() == storage_ptr(tensor) and tensor.nelement() * _SIZE[tensor.dtype] == storage_size(tensor)


def _remove_duplicate_names(
    state_dict: Dict[str, torch.Tensor],
    *,
    preferred_names: Optional[List[str]] = None,
    discard_names: Optional[List[str]] = None,
) -> Dict[str, List[str]]:
    """For each group of shared tensors, the name to keep and the names to drop."""
    preferred = set(preferred_names or [])
    discard = set(discard_names or [])
    to_remove: Dict[str, List[str]] = defaultdict(list)
    for group in _find_shared_tensors(state_dict):
        if len(group) <= 1:
            continue
        complete = {name for name in group if _is_complete(state_dict[name])}
        if not complete:
            raise RuntimeError(
                "Error while trying to find names to remove to save state dict, but found no suitable name to keep"
                f" for saving amongst: {group}. None is covering the entire storage.Refusing to save/load the model"
                " since you could be storing much more memory than needed. Please refer to"
                " https://huggingface.co/docs/safetensors/torch_shared_tensors for more information. Or open an"
                " issue."
            )
        keep = sorted(complete)[0]
        not_discarded = sorted(complete - discard)
        if not_discarded:
            keep = not_discarded[0]
        wanted = sorted(complete & preferred)
        if wanted:
            keep = wanted[0]
        for name in sorted(group):
            if name != keep:
                to_remove[keep].append(name)
    return to_remove


# -- saving ------------------------------------------------------------------

def _evaluate_tensors_for_save(tensors: Dict[str, torch.Tensor], remedy: str = "save_model") -> None:
    """The reference's checks before a save, in its order and wording: a
    dict of tensors, none sparse, none sharing memory."""
    if not isinstance(tensors, dict):
        raise ValueError(f"Expected a dict of [str, torch.Tensor] but received {type(tensors)}")
    sparse = []
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"Key `{printable(name)}` is invalid, expected torch.Tensor but received {type(tensor)}")
        if tensor.layout != torch.strided:
            sparse.append(name)
    if sparse:
        raise ValueError(
            f"You are trying to save a sparse tensors: `{sparse}` which this library does not support."
            " You can make it a dense tensor before saving with `.to_dense()` but be aware this might"
            " make a much larger file than needed."
        )
    shared = [names for names in _find_shared_tensors(tensors) if len(names) > 1]
    if shared:
        raise RuntimeError(
            f"""
            Some tensors share memory, this will lead to duplicate memory on disk and potential differences when loading them again: {shared}.
            A potential way to correctly save your model is to use `{remedy}`.
            More information at https://huggingface.co/docs/safetensors/torch_shared_tensors
            """
        )


def _flatten(tensors: Dict[str, torch.Tensor], remedy: str = "save_model") -> List[_save.Item]:
    _evaluate_tensors_for_save(tensors, remedy)
    return [_item(name, tensor) for name, tensor in tensors.items()]


def _check_contiguous(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_contiguous():
        raise ValueError(
            f"You are trying to save a non contiguous tensor: `{name}` which is not allowed. It either means you"
            " are trying to save tensors which are reference of each other in which case it's recommended to save"
            " only the full tensors, and reslice at load time, or simply call `.contiguous()` on your tensor to"
            " pack it before saving."
        )


def _to_ndarray(tensor: torch.Tensor) -> Tuple[Any, torch.Tensor]:
    """A uint8 numpy view of a contiguous tensor's bytes (copied to the CPU
    first if needed, no other copy), and the CPU tensor that owns them.
    (torch only runs on little-endian hosts: the bytes are in file order.)"""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    if tensor.is_conj() or tensor.is_neg():
        # Lazy conjugate/negative views: their memory holds the other values
        # (the reference saves those, wrongly); materialise the real ones.
        tensor = tensor.resolve_conj().resolve_neg()
    # A contiguous tensor may still have an odd stride on a dimension of size
    # 0 or 1 (x[:1, 2]: stride (4,)), which reshape keeps and a byte view
    # refuses: the flat view is made with stride 1 outright (same memory).
    flat = tensor.as_strided((tensor.numel(),), (1,))
    return flat.view(torch.uint8).numpy(), tensor


def _item(name: str, tensor: torch.Tensor) -> _save.Item:
    _check_contiguous(name, tensor)
    try:
        code = _dtypes.BY_NAME[str(tensor.dtype).removeprefix("torch.")]
    except KeyError:
        raise KeyError(tensor.dtype) from None
    shape = list(tensor.shape)
    if code == "F4" and shape:
        shape[-1] *= 2
    return name, code, shape, _to_ndarray(tensor)[0]


def _flatten_as_ptr(tensors: Dict[str, torch.Tensor], keep_alive_buffer: List[Any]) -> Dict[str, TensorSpec]:
    """The reference's raw-pointer form of a save: one `TensorSpec` per
    tensor; `keep_alive_buffer` keeps the memory they point to alive."""
    _evaluate_tensors_for_save(tensors)
    flattened = {}
    for name, tensor in tensors.items():
        _check_contiguous(name, tensor)
        array, owner = _to_ndarray(tensor)
        keep_alive_buffer.append((array, owner))
        flattened[name] = TensorSpec(
            dtype=str(tensor.dtype).split(".")[-1], shape=list(tensor.shape), data_ptr=array.ctypes.data, data_len=array.nbytes
        )
    return flattened


def save(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """Serializes tensors to bytes."""
    return _save.write(_flatten(tensors), metadata)


def save_file(tensors: Dict[str, torch.Tensor], filename: Union[str, os.PathLike], metadata: Optional[Dict[str, str]] = None) -> None:
    """Saves tensors to a file, atomically, reading their memory in place; an
    s3://, gs:// or az:// URL is uploaded (see `tensafe._save.write`)."""
    _save.write(_flatten(tensors), metadata, filename)


def save_sharded(
    tensors: Dict[str, torch.Tensor],
    save_directory: Union[str, os.PathLike],
    max_shard_size: Union[int, str] = "5GB",
    metadata: Optional[Dict[str, str]] = None,
) -> Optional[Dict[str, Any]]:
    """Saves tensors as `model-0000i-of-0000n.safetensors` shards of at most
    `max_shard_size` plus `model.safetensors.index.json` (the transformers
    layout), in dict order. Returns the index, or None if one file sufficed
    (then written as `model.safetensors`). Each shard carries `{"format":
    "pt"}`, as transformers and huggingface_hub write (and transformers 4
    requires to load it), and `metadata` (its `format` entry, if any, wins).
    `save_directory` may be a URL prefix (s3://, gs://, az://): the shards
    are uploaded, then the index. Open the result with `safe_open` or
    `load_file` on the directory.

    Locally, nothing is replaced until every file is written (an error leaves
    the directory as it was), and then, as transformers' `save_pretrained`
    does, what remains of an earlier checkpoint saved there under the same
    names is removed: shards `model-0000i-of-0000n.safetensors` that are not
    new, and `model.safetensors` beside a new index (or an index beside a
    new `model.safetensors`). Other files are left alone."""
    metadata = {"format": "pt", **(_save.check_metadata(metadata) or {})}
    return _save.write_sharded(_flatten(tensors, "save_model_sharded"), save_directory, max_shard_size, metadata)


def _state_without_aliases(model: torch.nn.Module, metadata: Optional[Dict[str, str]], force_contiguous: bool) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, str]]]:
    """A model's state dict with each group of tensors sharing memory (tied
    weights) stored once, under the name `_remove_duplicate_names` keeps; each
    dropped name is recorded in `metadata` as an alias of the kept one (in the
    caller's dict, as the reference does), unless `metadata` has that key."""
    state_dict = model.state_dict()
    to_remove = _remove_duplicate_names(state_dict)
    for kept, removed in to_remove.items():
        for name in removed:
            if metadata is None:
                metadata = {}  # only when there is an alias to record, as the reference does
            if name not in metadata:
                metadata[name] = kept
            del state_dict[name]
    if force_contiguous:
        state_dict = {k: v.contiguous() for k, v in state_dict.items()}
    return state_dict, metadata


def save_model(model: torch.nn.Module, filename: str, metadata: Optional[Dict[str, str]] = None, force_contiguous: bool = True) -> None:
    """Saves a model's state dict, storing shared tensors once (aliases go to metadata)."""
    state_dict, metadata = _state_without_aliases(model, metadata, force_contiguous)
    try:
        save_file(state_dict, filename, metadata=metadata)
    except ValueError as e:
        raise ValueError(f"{e} Or use save_model(..., force_contiguous=True), read the docs for potential caveats.") from e


def save_model_sharded(
    model: torch.nn.Module,
    save_directory: Union[str, os.PathLike],
    max_shard_size: Union[int, str] = "5GB",
    metadata: Optional[Dict[str, str]] = None,
    force_contiguous: bool = True,
) -> Optional[Dict[str, Any]]:
    """`save_sharded` of a model's state dict, with tied weights stored once
    as `save_model` stores them (each dropped name is an alias in every
    shard's metadata). `load_model(model, save_directory)` reads it back into
    a model, which ties them again."""
    state_dict, metadata = _state_without_aliases(model, metadata, force_contiguous)
    try:
        return save_sharded(state_dict, save_directory, max_shard_size, metadata)
    except ValueError as e:
        raise ValueError(f"{e} Or use save_model_sharded(..., force_contiguous=True).") from e


# -- loading -----------------------------------------------------------------

def _view2torch(safeview: List[Tuple[str, Dict[str, Any]]]) -> Dict[str, torch.Tensor]:
    """Tensors from `deserialize`'s output, on the CPU."""
    return {name: _to_torch(t["dtype"], t["shape"], t["data"], "cpu") for name, t in safeview}


def load(data: bytes) -> Dict[str, torch.Tensor]:
    """Loads tensors from bytes (every dtype), in file order."""
    return _view2torch(deserialize(data))


def load_file(
    filename: Union[str, os.PathLike],
    device: Union[str, int] = "cpu",
    *,
    backend: str = "mmap",
    threads: Optional[int] = None,
    progress: Any = None,
    drop_cache: bool = False,
) -> Dict[str, torch.Tensor]:
    """Loads every tensor of a file, in file order.

    `backend="mmap"` (default): lazy zero-copy views, the file read into the
    page cache ahead of them in the background. `backend="pread"`: one
    allocation filled by `threads` parallel readers, the fast path on network
    filesystems and for private memory; `backend="auto"` picks between them by
    filesystem. See `safe_open.get_tensors` for `progress` and `drop_cache`.
    """
    with safe_open(filename, framework="pt", device=device, backend=backend) as f:
        return f.get_tensors(threads=threads, progress=progress, drop_cache=drop_cache)


class TensorParallelLoad(NamedTuple):
    """What `load_tensor_parallel` returns."""

    tensors: Dict[str, torch.Tensor]
    #: Bytes of tensor data this rank read.
    bytes_read: int
    #: Bytes of tensor data in the whole checkpoint.
    total_bytes: int


def _part_index(split: Optional[Tuple[int, int, int]]) -> tuple:
    """The basic index that selects a `TensorParallelPlan.split` result
    `(dim, start, stop)`; the whole tensor for `None` (replicated)."""
    return () if split is None else (slice(None),) * split[0] + (slice(split[1], split[2]),)


def load_tensor_parallel(
    filename: Union[str, os.PathLike],
    rank: int,
    world_size: int,
    rules: List[Tuple[str, Optional[int]]],
    device: Union[str, int] = "cpu",
    *,
    backend: str = "pread",
) -> TensorParallelLoad:
    """Loads only this rank's part of every tensor of a file or sharded checkpoint.

    `rules` are `(glob pattern, dim)` pairs matched against tensor names in
    order: the first match splits the tensor along `dim` (contiguous parts,
    the first `size % world_size` ranks one row larger), `dim=None` replicates
    it; unmatched tensors are replicated. Only the selected bytes are read
    from storage, and the gaps of at most 16 KiB between them (the rows of
    a column part are read together, which is faster). A local file's parts
    are read by parallel readers into one allocation (on the CPU each tensor
    still has a storage of its own; on a device each is copied there).
    """
    # A rule's dim counts from the first dimension: not negative.
    _check_count("rank", rank, 0)
    _check_count("world_size", world_size, 1)
    # Pairs as tuples (a JSON or YAML config gives lists).
    rules = [tuple(rule) for rule in rules]
    for pattern, dim in rules:
        if dim is not None:
            _check_count(f"the dim of rule {pattern!r}", dim, 0)
    plan = TensorParallelPlan(rank, world_size, rules)
    tensors: Dict[str, torch.Tensor] = {}
    total = 0
    with safe_open(filename, framework="pt", device=device, backend=backend) as f:
        for shard in f._parts():
            file = shard._open()
            selections = []
            for name in file.offset_keys():
                code, full_shape, _, _ = file.info(name)
                selections.append((name, _part_index(plan.split(name, full_shape))))
                total += _dtypes.byte_size(code, full_shape)
            if file.backend in ("pread", "mmap"):
                # Every selection at once: parallel reads into one allocation
                # (then each part to the device, as `get_slice` moves it).
                parts = _read_selections(file, selections)
                target = shard._device
                tensors.update(parts if target == "cpu" else ((name, part.to(target)) for name, part in parts.items()))
            else:
                tensors.update((name, shard.get_slice(name)[index]) for name, index in selections)
    read = sum(tensor.element_size() * tensor.nelement() for tensor in tensors.values())
    return TensorParallelLoad(tensors, read, total)


def load_model(
    model: torch.nn.Module,
    filename: Union[str, os.PathLike],
    strict: bool = True,
    device: Union[str, int] = "cpu",
    *,
    backend: str = "mmap",
) -> Tuple[Set[str], List[str]]:
    """Loads a file written by `save_model` into `model`; returns (missing, unexpected)."""
    state_dict = load_file(filename, device=device, backend=backend)
    model_state_dict = model.state_dict()
    to_remove = _remove_duplicate_names(model_state_dict, preferred_names=list(state_dict.keys()))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = set(missing)
    for removed in to_remove.values():
        for name in removed:
            if name in missing:
                missing.remove(name)
            else:
                unexpected.append(name)
    if strict and (missing or unexpected):
        error = f"Error(s) in loading state_dict for {model.__class__.__name__}:"
        if missing:
            error += "\n    Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(missing))
        if unexpected:
            error += "\n    Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(unexpected))
        raise RuntimeError(error)
    return missing, unexpected
