"""Saving reads tensor memory in place: peak RSS barely moves while saving 1 GiB."""

import subprocess
import sys

SCRIPT = r"""
import resource, sys, torch, numpy as np
framework, path = sys.argv[1], sys.argv[2]
# 1 GiB over several tensors, touched so that it is resident before measuring.
tensors = {f"layer{i}": torch.ones(64 * 1024 * 1024, dtype=torch.float32) for i in range(4)}
if framework == "numpy":
    tensors = {k: v.numpy() for k, v in tensors.items()}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if framework == "torch":
    import tensafe.torch as mod
else:
    import tensafe.numpy as mod
after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mod.save_file(tensors, path)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - after_import) // 1024)
"""


def _peak_growth_mib(framework, tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, framework, str(tmp_path / "big.safetensors")],
                         capture_output=True, text=True, check=True)
    size = (tmp_path / "big.safetensors").stat().st_size
    assert size > 2**30
    return int(out.stdout.strip().splitlines()[-1])


def test_saving_1gib_from_torch_grows_peak_rss_by_at_most_64mib(tmp_path):
    growth = _peak_growth_mib("torch", tmp_path)
    assert growth <= 64, f"peak RSS grew by {growth} MiB"


def test_saving_1gib_from_numpy_grows_peak_rss_by_at_most_64mib(tmp_path):
    growth = _peak_growth_mib("numpy", tmp_path)
    assert growth <= 64, f"peak RSS grew by {growth} MiB"
