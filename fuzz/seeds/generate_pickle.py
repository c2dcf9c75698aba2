#!/usr/bin/env python3
"""Writes the seeds of the `pickle` fuzz target into fuzz/seeds/pickle/.

Needs torch (use the project venv: `.venv/bin/python fuzz/seeds/generate_pickle.py`).
Seeds are small torch checkpoints in each container format, the bare
`data.pkl` pickles inside them (the target also runs the VM on raw bytes),
and a few hand-assembled hostile pickles (inert: nothing here loads them).
"""

import collections
import io
import pathlib
import zipfile

import torch

OUT = pathlib.Path(__file__).resolve().parent / "pickle"


def save(name, obj, **kwargs):
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    data = buf.getvalue()
    (OUT / name).write_bytes(data)
    if data.startswith(b"PK"):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            (OUT / (name + ".data.pkl")).write_bytes(z.read("archive/data.pkl"))


def main():
    OUT.mkdir(exist_ok=True)
    torch.manual_seed(0)
    base = torch.arange(6, dtype=torch.float32)
    save("state_dict", collections.OrderedDict(w=torch.randn(2, 3)))
    save("views", {"base": base, "slice": base[1:4], "t": base.view(2, 3).t(), "alias": base, "expand": torch.ones(1).expand(2, 2)})
    save("new_dtypes", {"f8": torch.zeros(2, dtype=torch.float8_e4m3fn), "u16": torch.zeros(2, dtype=torch.int32).to(torch.uint16)})
    save("conj_neg", {"c": torch.ones(2, dtype=torch.complex64).conj(), "n": torch.ones(2)._neg_view()})
    p = torch.nn.Parameter(torch.ones(2))
    p.note = 1
    save("parameter_state", {"p": p, "q": torch.nn.Parameter(torch.zeros(1))})
    save("nested", {"epoch": 1, "state_dict": {"w": torch.ones(1)}, "hp": {"lr": 0.1, "sizes": (1, 2), "tags": {"a"}}})
    save("protocol4", {"w": torch.ones(2), "b": torch.tensor(True)}, pickle_protocol=4)
    save("protocol5", {"w": torch.ones(2)}, pickle_protocol=5)
    save("legacy", {"w": base, "s": base[2:]}, _use_new_zipfile_serialization=False)
    (OUT / "hostile_reduce").write_bytes(b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.")
    (OUT / "hostile_stack_global").write_bytes(b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94\x93\x8c\x01x\x85R.")
    (OUT / "frame").write_bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94(u0N.")
    try:  # joblib: raw array bytes (and a nested object-array pickle) inside the stream
        import joblib
        import numpy as np

        buf = io.BytesIO()
        joblib.dump({"w": np.arange(4.0), "o": np.array([{"a": 1}], dtype=object), "after": 1}, buf)
        (OUT / "joblib").write_bytes(buf.getvalue())
    except ImportError:
        pass
    (OUT / "protocol0").write_bytes(b"(dp0\nS'a'\np1\nI1\nsVk\\u00e9\np2\nL12L\nsS'b'\np3\n(lp4\nF1.5\naI00\nas.")


if __name__ == "__main__":
    main()
