"""Pickle checkpoints, without unpickling: `convert` and `scan`.

Both run tensafe's own restricted pickle machine (Rust): it decodes the
pickle opcodes and models the few calls a weights file legitimately makes
(torch's tensor rebuild functions, storages, OrderedDict); it never imports or
calls anything, so a hostile file cannot run code here.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Union

from ._tensafe_rust import convert_pickle, scan_pickle

PathLike = Union[str, "os.PathLike[str]"]


def convert(
    input: PathLike,
    output: PathLike,
    *,
    key: Optional[str] = None,
    flatten: bool = False,
    include_optimizer: bool = False,
    dedupe: bool = False,
    keep_metadata: bool = False,
    lenient_bool: bool = False,
) -> Dict[str, Any]:
    """Converts a PyTorch checkpoint (`.pt`, `.pth`, `.bin`, `.ckpt`; zip or
    legacy format, detected by content; legacy tar archives are refused) to
    safetensors.

    `input` may also be a `pytorch_model.bin.index.json`, converting every
    shard into `output` as a directory with `model.safetensors.index.json`.
    The state dict is found in the usual places (a bare dict, `state_dict`,
    `model`, Lightning checkpoints), or at `key` (dotted path); `flatten`
    walks every container instead. Optimizer state is skipped unless
    `include_optimizer`. `dedupe` stores tensors that alias each other once,
    recording the removed names in the metadata like `save_model`;
    `keep_metadata` stores non-tensor values (epoch, hyper-parameters) as JSON
    strings in `__metadata__`.

    Returns the conversion report. Raises `SafetensorError` naming the byte
    offset, opcode, global and object path when the file contains anything a
    weights file should not.
    """
    report = convert_pickle(
        os.fspath(input),
        os.fspath(output),
        key=key,
        flatten=flatten,
        include_optimizer=include_optimizer,
        dedupe=dedupe,
        keep_non_tensors=keep_metadata,
        lenient_bool=lenient_bool,
    )
    return json.loads(report)


def scan(paths: Union[PathLike, List[PathLike]]) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
    """Reports every import and call loading a file would make, with a
    verdict: `"safe"`, `"suspicious"` or `"dangerous"`, or `"error"` where
    the file could not be scanned completely and nothing worse was found
    (`error` says why; `unsupported` is true
    for a compressed file it did not unpack). Handles torch checkpoints, pickles, `.npy`/`.npz` and
    `.joblib` by content. A list of paths gives a list of reports."""
    if isinstance(paths, (list, tuple)):
        return [json.loads(scan_pickle(os.fspath(p))) for p in paths]
    return json.loads(scan_pickle(os.fspath(paths)))
