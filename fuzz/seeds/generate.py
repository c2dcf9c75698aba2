#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into fuzz/seeds/<target>/.

The seeds are committed; rerun this script (no dependencies beyond the Python
standard library) after changing it. Each seed is a few hundred bytes at most.
"""

import json
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent


def safetensors(tensors, metadata=None, pad=True, data=None):
    """A file in the format: tensors is a list of (name, dtype, shape, nbytes)."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if pad:
        text += b" " * (-(8 + len(text)) % 8)
    body = data if data is not None else bytes((i * 7 + 3) % 256 for i in range(offset))
    return struct.pack("<Q", len(text)) + text + body


def raw(json_text, data=b""):
    """A file from literal header text (which need not be valid)."""
    text = json_text.encode()
    return struct.pack("<Q", len(text)) + text + data


HEADER_SEEDS = {
    "empty_object": raw("{}"),
    "one_f32": safetensors([("w", "F32", [2, 2], 16)]),
    "mixed_dtypes": safetensors(
        [("a", "F64", [2], 16), ("b", "BF16", [3], 6), ("c", "U8", [2, 1], 2), ("d", "BOOL", [1], 1)]
    ),
    "scalar_and_empty": safetensors([("s", "I32", [], 4), ("z", "F16", [0, 3], 0), ("y", "U8", [0], 0)]),
    "sub_byte": safetensors([("f4", "F4", [2, 2], 2), ("f6", "F6_E2M3", [4], 3), ("e8", "F8_E8M0", [1], 1)]),
    "metadata": safetensors([("x", "I8", [3], 3)], metadata={"format": "pt", "k": "v\u00e9\n\"q\""}),
    "metadata_null": raw('{"__metadata__":null}'),
    "unicode_names": safetensors([("\u00e9t\u00e9", "U16", [1], 2), ("\u65e5\u672c", "I64", [1], 8)]),
    "unknown_fields_and_spaces": raw(
        '{ "t" : { "dtype" : "U8" , "shape" : [ 2 ] , "data_offsets" : [ 0 , 2 ] , "extra" : [1,{"x":null}] } }   ',
        b"\x01\x02",
    ),
    "unpadded": safetensors([("q", "C64", [1], 8)], pad=False),
    "escaped_name": raw('{"a\\u0062\\"c":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\xff"),
    # Invalid on purpose, as starting points for the error paths.
    "bad_offsets": raw('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', bytes(8)),
    "overflow_shape": raw('{"a":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,4]}}', bytes(4)),
    "duplicate_name": raw(
        '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
        bytes(2),
    ),
    "short": b"\x08\x00\x00",
}


def int_(v):
    """An int of the slice target's encoding: one signed byte, or 0x7f + i64."""
    if -128 <= v <= 127 and v != 0x7F:
        return struct.pack("<b", v)
    return b"\x7f" + struct.pack("<q", v)


def index(i):
    return b"\x00" + int_(i)


def rng(start=None, stop=None, step=None):
    flags = (start is not None) | (stop is not None) << 1 | (step is not None) << 2
    out = b"\x01" + bytes([flags])
    for bound in (start, stop, step):
        if bound is not None:
            out += int_(bound)
    return out


ELLIPSIS = b"\x02"
NEWAXIS = b"\x03"
DTYPE = {"BOOL": 0, "F4": 1, "F6_E2M3": 2, "U8": 4, "I16": 11, "F32": 17, "F64": 19}


def case(dtype, shape, *indices):
    return bytes([DTYPE[dtype], len(shape), *shape]) + b"".join(indices)


SLICE_SEEDS = {
    "full": case("U8", [4, 5, 6]),
    "index_neg": case("U8", [4, 5, 6], index(-1), rng(), index(2)),
    "step": case("F32", [10, 5], rng(1, 6, 2), rng(1, 5, 3)),
    "ellipsis_tail": case("U8", [4, 5, 6], ELLIPSIS, rng(-4, -1, 2)),
    "clamped": case("I16", [4, 5, 6], rng(), rng(1, 100, 3), index(0)),
    "empty_range": case("U8", [4, 5], rng(3, 1)),
    "newaxis": case("F64", [3, 2], NEWAXIS, index(2), ELLIPSIS, NEWAXIS),
    "scalar": case("F32", [], NEWAXIS, ELLIPSIS),
    "sub_byte": case("F4", [4, 4], rng(), rng(2, 4)),
    "sub_byte_misaligned": case("F6_E2M3", [4, 4], rng(), rng(1, 3)),
    "extremes": case("BOOL", [16, 16], rng(-(2**63), 2**63 - 1, 2**63 - 1), index(-(2**63))),
    "zero_dim": case("U8", [0, 3, 16], rng(None, None, 5)),
    "rank4": case("U8", [2, 3, 4, 5], index(1), rng(None, None, 2), ELLIPSIS, index(-2)),
}


SHARD = b"\n--shard--\n"


def checkpoint(weight_map, shards, metadata=None):
    """An index (weight_map: name -> file) and its shard files, as the
    shard_index target reads them: the index text, then each file after SHARD."""
    index = {"weight_map": weight_map}
    if metadata is not None:
        index["metadata"] = metadata
    return json.dumps(index).encode() + b"".join(SHARD + shard for shard in shards)


SHARD_INDEX_SEEDS = {
    "two_shards": checkpoint(
        {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"},
        [safetensors([("a", "F32", [2], 8), ("b", "U8", [3], 3)]), safetensors([("c", "BF16", [2, 2], 8)])],
        metadata={"total_size": 19},
    ),
    "wrong_shard": checkpoint({"a": "s2.safetensors", "b": "s1.safetensors"},
                              [safetensors([("a", "F32", [1], 4)]), safetensors([("b", "F32", [1], 4)])]),
    "missing_tensor": checkpoint({"a": "s1.safetensors", "z": "s1.safetensors"}, [safetensors([("a", "I8", [1], 1)])]),
    "bad_total": checkpoint({"a": "s1.safetensors"}, [safetensors([("a", "I8", [1], 1)])], metadata={"total_size": 5}),
    "escaping_path": checkpoint({"a": "../s1.safetensors"}, []),
    "null_metadata": b'{"metadata": null, "weight_map": {}}',
    "not_a_name": b'{"weight_map": {"a": 3}}',
}


def main():
    for target, seeds in (("header", HEADER_SEEDS), ("slice", SLICE_SEEDS), ("shard_index", SHARD_INDEX_SEEDS)):
        out = HERE / target
        out.mkdir(exist_ok=True)
        for name, content in seeds.items():
            assert len(content) <= 512, name
            (out / name).write_bytes(content)


if __name__ == "__main__":
    main()
