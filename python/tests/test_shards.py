"""Sharded checkpoints: the huggingface_hub / transformers layout, opened as one checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import huggingface_hub
import safetensors
import safetensors.torch as ref_pt
import tensafe
import tensafe.numpy as ts_np
import tensafe.torch as ts_pt


def state_dict():
    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(100 + 37 * i, generator=g) for i in range(12)}
    sd["big"] = torch.randn(3000, generator=g)  # over the limit: a shard of its own
    sd["layers.0.bias"] = torch.arange(7, dtype=torch.int64)
    return sd


def test_same_shards_as_huggingface_hub(tmp_path):
    sd = state_dict()
    theirs, ours = tmp_path / "hub", tmp_path / "ours"
    theirs.mkdir()
    huggingface_hub.save_torch_state_dict(sd, str(theirs), max_shard_size=2000)
    index = ts_pt.save_sharded(sd, ours, max_shard_size=2000)
    assert sorted(os.listdir(theirs)) == sorted(os.listdir(ours))
    for name in os.listdir(theirs):
        if name.endswith(".safetensors"):
            assert (theirs / name).read_bytes() == (ours / name).read_bytes(), name
    hub_index = json.loads((theirs / "model.safetensors.index.json").read_text())
    assert json.loads((ours / "model.safetensors.index.json").read_text()) == hub_index == index
    # Written the transformers way: sorted keys, two-space indent, final newline.
    text = (ours / "model.safetensors.index.json").read_text()
    assert text == json.dumps(hub_index, indent=2, sort_keys=True) + "\n"


def test_shards_keep_their_format_beside_user_metadata(tmp_path):
    # transformers 4 refuses shards whose metadata has no `format`.
    ts_pt.save_sharded(state_dict(), tmp_path, max_shard_size="2KB", metadata={"k": "v"})
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        with safetensors.safe_open(shard, "pt") as f:
            assert f.metadata() == {"format": "pt", "k": "v"}
    ts_pt.save_sharded(state_dict(), tmp_path / "tf", metadata={"format": "tf"})
    with safetensors.safe_open(tmp_path / "tf" / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "tf"}
    with pytest.raises(TypeError, match="argument 'metadata'"):
        ts_pt.save_sharded(state_dict(), tmp_path / "bad", metadata="x")


class TiedModel(torch.nn.Module):
    """An output layer that shares the embedding's weight, as many language models do."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.lin = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight


def test_a_model_with_tied_weights_saves_sharded_as_huggingface_hub_splits_it(tmp_path):
    torch.manual_seed(0)
    model = TiedModel()
    with pytest.raises(RuntimeError, match="use `save_model_sharded`"):
        ts_pt.save_sharded(model.state_dict(), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    hub, ours = tmp_path / "hub", tmp_path / "ours"
    hub.mkdir()
    huggingface_hub.save_torch_state_dict(model.state_dict(), str(hub), max_shard_size=2000)
    index = ts_pt.save_model_sharded(model, ours, max_shard_size=2000)
    hub_index = json.loads((hub / "model.safetensors.index.json").read_text())
    # The same tied name dropped, the same split; the hub records the alias in
    # the index, tensafe in every shard (where safe_open's metadata() shows it).
    assert index["weight_map"] == hub_index["weight_map"] == {"emb.weight": "model-00001-of-00002.safetensors", "lin.bias": "model-00002-of-00002.safetensors", "lin.weight": "model-00002-of-00002.safetensors"}
    assert hub_index["metadata"] == {**index["metadata"], "head.weight": "emb.weight"}
    for name in hub_index["weight_map"].values():
        with safetensors.safe_open(hub / name, "pt") as theirs, safetensors.safe_open(ours / name, "pt") as f:
            assert f.metadata() == {"format": "pt", "head.weight": "emb.weight"}
            assert f.keys() == theirs.keys()
            for key in f.keys():
                assert torch.equal(f.get_tensor(key), theirs.get_tensor(key))

    loaded = TiedModel()
    assert ts_pt.load_model(loaded, ours) == (set(), [])
    assert loaded.head.weight is loaded.emb.weight
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_one_shard_is_a_plain_model_file(tmp_path):
    sd = {"a": torch.ones(3)}
    assert ts_pt.save_sharded(sd, tmp_path, max_shard_size="5GB") is None
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == ref_pt.save(sd, metadata={"format": "pt"})


def test_a_safetensors_file_named_json_opens_as_one_file(tmp_path):
    # Only the content tells an index from a safetensors file with that name.
    sd = state_dict()
    path = tmp_path / "weights.json"
    ts_pt.save_file(sd, path, metadata={"format": "pt"})
    for lib in (tensafe, safetensors):
        with lib.safe_open(path, "pt") as f:
            assert f.metadata() == {"format": "pt"} and f.keys() == sorted(sd)
    assert type(tensafe.safe_open(path, "pt")) is tensafe.safe_open
    assert all(torch.equal(ts_pt.load_file(path)[k], v) for k, v in sd.items())


@pytest.mark.parametrize("target", ["dir", "index"])
@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_open_a_checkpoint_as_one(tmp_path, target, backend):
    sd = state_dict()
    ts_pt.save_sharded(sd, tmp_path, max_shard_size="2KB")
    path = tmp_path if target == "dir" else tmp_path / "model.safetensors.index.json"
    with tensafe.safe_open(path, "pt", backend=backend) as f:
        assert isinstance(f, tensafe.safe_open)
        assert f.keys() == sorted(sd)
        assert set(f.offset_keys()) == set(sd)
        assert f.metadata() == {"format": "pt"}
        for name, tensor in sd.items():
            assert torch.equal(f.get_tensor(name), tensor), name
        assert torch.equal(f.get_slice("big")[10:20], sd["big"][10:20])
        everything = f.get_tensors()
    assert set(everything) == set(sd)
    with pytest.raises(tensafe.SafetensorError, match="File is closed"):
        f.keys()
    loaded = ts_pt.load_file(path, backend=backend)
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_progress_counts_the_whole_checkpoint(tmp_path, capsys):
    sd = state_dict()
    ts_pt.save_sharded(sd, tmp_path, max_shard_size="2KB")
    shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    assert len(shards) > 2
    total = sum(os.path.getsize(tmp_path / p) - 8 - int.from_bytes((tmp_path / p).read_bytes()[:8], "little") for p in shards)
    seen = []
    loaded = ts_pt.load_file(tmp_path, backend="pread", progress=lambda done, whole: seen.append((done, whole)))
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    assert {whole for _, whole in seen} == {total}, "one total: the checkpoint's"
    assert [done for done, _ in seen] == sorted(done for done, _ in seen) and seen[-1][0] == total
    ts_pt.load_file(tmp_path, backend="pread", progress=True)
    assert capsys.readouterr().err.count("\n") == 1, "one bar, ended once"
    # Mapped shards are not read, but the bar still moves shard by shard and ends.
    seen.clear()
    ts_pt.load_file(tmp_path, backend="mmap", progress=lambda done, whole: seen.append((done, whole)))
    assert len(seen) == len(shards) and seen[-1] == (total, total) and seen == sorted(seen)


def test_numpy_sharded_round_trip(tmp_path):
    arrays = {f"w{i}": np.full((50,), i, dtype=np.float32) for i in range(10)}
    index = ts_np.save_sharded(arrays, tmp_path, max_shard_size=600)
    assert len(set(index["weight_map"].values())) == 4
    loaded = ts_np.load_file(tmp_path)
    assert all(np.array_equal(loaded[k], v) for k, v in arrays.items())


def test_a_checkpoint_with_more_shards_than_open_files_allowed_says_what_to_do(tmp_path):
    ts_pt.save_sharded({f"w{i}": torch.ones(64) for i in range(80)}, tmp_path, max_shard_size=256)
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 80
    probe = (
        "import resource, sys, tensafe.torch as t\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "try:\n    t.load_file(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert out.startswith("SafetensorError ") and "model-000" in out, out
    assert "Too many open files" in out and "the checkpoint's 80 shards are held open together" in out and "ulimit -n" in out, out


def test_inconsistent_checkpoints_are_refused_with_the_reason(tmp_path):
    ts_pt.save_sharded(state_dict(), tmp_path, max_shard_size=2000)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = sorted(set(index["weight_map"].values()))

    broken = dict(index, metadata={"total_size": index["metadata"]["total_size"] + 1})
    index_path.write_text(json.dumps(broken))
    with pytest.raises(tensafe.SafetensorError, match="declares total_size"):
        tensafe.safe_open(tmp_path, "pt")

    moved = dict(index, weight_map=dict(index["weight_map"], **{"layers.0.weight": files[-1]}))
    index_path.write_text(json.dumps(moved))
    with pytest.raises(tensafe.SafetensorError, match="layers.0.weight"):
        tensafe.safe_open(tmp_path, "pt")

    index_path.write_text(json.dumps(index))
    os.remove(tmp_path / files[1])
    with pytest.raises(tensafe.SafetensorError, match=f"missing shard {files[1]}"):
        tensafe.safe_open(tmp_path, "pt")
    with pytest.raises(FileNotFoundError):
        tensafe.safe_open(tmp_path / "nope.json", "pt")
