"""tensafe vs the reference `safetensors` from Python, side by side in one run.

    .venv/bin/python bench/python_bench.py [--gib 1.0] [--small 20000] [--reps 5] [--dir DIR] [--settle 0.5]

Generates two deterministic files — a model-like bf16 state dict of about
`--gib` GiB and a file of `--small` small tensors — then, interleaving the two
libraries in every repetition, measures:

- open:        `safe_open` + `keys()` + `get_tensors()` (lazy, page cache warm)
- read cold:   open + touch every page of every tensor, file evicted first
               with posix_fadvise(DONTNEED), then `--settle` seconds of rest
- read warm:   the same with the file in the page cache
- save:        `save_file` of the state dict (tensafe fsyncs; the reference does
               not, so it is also shown with an fsync added)
- peak RSS:    growth of peak RSS while saving (own process per measurement)

and prints medians and ratios (reference time / tensafe time: > 1 means
tensafe is faster).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import torch

import safetensors
import safetensors.torch
import tensafe
import tensafe.torch

LIBS = {"tensafe": (tensafe, tensafe.torch), "reference": (safetensors, safetensors.torch)}


def model_like(gib: float) -> dict:
    """Transformer-shaped bf16 tensors adding up to about `gib` GiB."""
    g = torch.Generator().manual_seed(0)
    hidden = 2048
    per_layer = 4 * hidden * hidden + 3 * hidden * 5504 + 2 * hidden  # attention + MLP + norms
    layers = max(1, int(gib * 2**30 / 2 / per_layer))
    out = {"embed.weight": torch.randn(32000, hidden, generator=g).to(torch.bfloat16)}
    for i in range(layers):
        p = f"layers.{i}."
        for name in ("q", "k", "v", "o"):
            out[p + f"attn.{name}.weight"] = torch.randn(hidden, hidden, generator=g).to(torch.bfloat16)
        out[p + "mlp.up.weight"] = torch.randn(5504, hidden, generator=g).to(torch.bfloat16)
        out[p + "mlp.gate.weight"] = torch.randn(5504, hidden, generator=g).to(torch.bfloat16)
        out[p + "mlp.down.weight"] = torch.randn(hidden, 5504, generator=g).to(torch.bfloat16)
        out[p + "norm1.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        out[p + "norm2.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    return out


def small_tensors(count: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {f"experts.{i // 64}.w{i % 64}": torch.randn(16, generator=g) for i in range(count)}


def run_interleaved(
    cases: dict, reps: int, after_each: Any = None, keep_going: bool = False, shuffle: Optional[int] = None, after_repetition: Any = None
) -> dict:
    """Runs every case `reps` times, in insertion order then reversed, so that
    drift in the machine's state hits every case alike; a case returns its
    own time in seconds. Returns each case's times. `after_each` runs after
    every case; with `keep_going`, a case that raises is reported and left
    out of the rest (and of the result), and the others still run. With
    `shuffle` (a seed), each repetition runs the cases in a new random
    order instead, so that no case always follows the same one.
    `after_repetition(done, times)` runs after each repetition but the last
    (a long run cut short can then still say what it measured)."""
    times: dict = {name: [] for name in cases}
    orders = random.Random(shuffle) if shuffle is not None else None
    for rep in range(reps):
        if orders is not None:
            order = orders.sample(list(cases), len(cases))
        else:
            order = list(cases) if rep % 2 == 0 else list(reversed(cases))
        for name in order:
            if name not in times:
                continue
            try:
                times[name].append(cases[name]())
            except BaseException as e:  # a Rust panic (PanicException) is one too
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                if not keep_going:
                    raise
                del times[name]
                print(f"FAILED: {name}: {type(e).__name__}: {e}")
            if after_each is not None:
                after_each()
        if after_repetition is not None and rep + 1 < reps:
            after_repetition(rep + 1, times)
    return times


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def touch_all(tensors: dict) -> None:
    """Reads one element per 4 KiB page of every tensor (pulls every page in)."""
    for t in tensors.values():
        flat = t.reshape(-1)
        if flat.numel():
            step = max(1, 4096 // flat.element_size())
            flat[::step].sum()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cold_case(fn, path: str, settle: float, timer=timed):
    """A case for `run_interleaved`: evicts `path`, rests `settle` seconds,
    then returns `timer(fn)`. The rest lets the eviction settle (the freed
    memory, the host's disk cache): without it, a case's time depended on
    which case ran before it."""
    def run() -> float:
        evict(path)
        time.sleep(settle)
        return timer(fn)
    return run


def open_all(lib, path):
    with lib.safe_open(path, "pt") as f:
        f.keys()
        return f.get_tensors()


RSS_SCRIPT = r"""
import resource, sys, torch
package = "tensafe" if sys.argv[1] == "tensafe" else "safetensors"
mod = __import__(package + ".torch", fromlist=["_"])
with __import__(package).safe_open(sys.argv[2], "pt") as f:
    tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mod.save_file(tensors, sys.argv[3])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--small", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--settle", type=float, default=0.5, help="seconds of rest after each eviction, before the cold case is timed")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        big_path, small_path = os.path.join(tmp, "big.safetensors"), os.path.join(tmp, "small.safetensors")
        big = model_like(args.gib)
        safetensors.torch.save_file(big, big_path)
        safetensors.torch.save_file(small_tensors(args.small), small_path)
        size = os.path.getsize(big_path)
        print(f"files: {size / 2**30:.2f} GiB in {len(big)} bf16 tensors; {args.small} small tensors "
              f"({os.path.getsize(small_path) / 2**20:.1f} MiB); {args.reps} repetitions, medians")

        results: dict = {}

        def record(case, lib, seconds):
            results.setdefault(case, {}).setdefault(lib, []).append(seconds)

        for rep in range(args.reps):
            order = list(LIBS) if rep % 2 == 0 else list(reversed(LIBS))
            for lib_name in order:
                core, mod = LIBS[lib_name]
                record(f"open {args.small} small", lib_name, timed(lambda: open_all(core, small_path)))
                record(f"open {len(big)} big (lazy)", lib_name, timed(lambda: open_all(core, big_path)))
                read_all = cold_case(lambda: touch_all(open_all(core, big_path)), big_path, args.settle)
                record("open + read all, cold", lib_name, read_all())
                record("open + read all, warm", lib_name, timed(lambda: touch_all(open_all(core, big_path))))
                out = os.path.join(tmp, f"save-{lib_name}.safetensors")
                record("save", lib_name, timed(lambda: mod.save_file(big, out)))
                if lib_name == "reference":
                    def durable():
                        mod.save_file(big, out)
                        fd = os.open(out, os.O_RDONLY)
                        os.fsync(fd)
                        os.close(fd)
                    record("save + fsync", lib_name, timed(durable))
                else:
                    record("save + fsync", lib_name, results["save"][lib_name][-1])
                os.remove(out)

        rss = {}
        for lib_name in LIBS:
            out = os.path.join(tmp, f"rss-{lib_name}.safetensors")
            run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, lib_name, big_path, out], capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"peak-RSS measurement of {lib_name} failed:\n{run.stderr}")
            rss[lib_name] = int(run.stdout.strip().splitlines()[-1])

        print(f"\n{'case':<28}{'tensafe':>12}{'reference':>12}{'ref/tensafe':>13}")
        for case, by_lib in results.items():
            ours, theirs = statistics.median(by_lib["tensafe"]), statistics.median(by_lib["reference"])
            extra = ""
            if "read all" in case or case.startswith("save"):
                extra = f"   ({size / ours / 1e9:.2f} vs {size / theirs / 1e9:.2f} GB/s)"
            print(f"{case:<28}{ours * 1e3:>10.1f}ms{theirs * 1e3:>10.1f}ms{theirs / ours:>12.2f}x{extra}")
        print(f"{'save: peak RSS growth':<28}{rss['tensafe']:>10}MiB{rss['reference']:>10}MiB")


if __name__ == "__main__":
    main()
