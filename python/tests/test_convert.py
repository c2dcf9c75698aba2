"""`tensafe convert` / `scan` / `diff` on checkpoints written by real torch.

Every benign file is produced here with `torch.save`. The oracle is what the
usual (unsafe) migration would give: `torch.load(weights_only=True)`, then
the reference `safetensors.torch.save_file`. Our converter never unpickles;
its output must be bit-identical to the oracle's (whole files: names,
dtypes, shapes, bytes and the `{"format": "pt"}` metadata).
"""

import collections
import io
import json
import subprocess
import zipfile

import pytest
import torch

import safetensors
import safetensors.torch as ref_pt
import tensafe



def run(exe, *args):
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)


def convert(exe, src, dst, *flags):
    out = run(exe, "convert", src, dst, *flags)
    assert out.returncode == 0, out.stderr + out.stdout
    return out


def oracle_bytes(state, tmp_path, metadata=None):
    """The reference's file for a dict of tensors (made contiguous)."""
    plain = {k: v.detach().resolve_conj().resolve_neg().contiguous().clone() for k, v in state.items()}
    path = tmp_path / "oracle.safetensors"
    ref_pt.save_file(plain, path, metadata={"format": "pt", **(metadata or {})})
    return path.read_bytes()


def check(exe, tmp_path, obj, expected=None, *flags, name="ckpt.pt", **save_kwargs):
    """Saves `obj` with torch, converts it, and compares with the oracle built
    from `torch.load(weights_only=True)` (or from `expected`)."""
    src = tmp_path / name
    torch.save(obj, src, **save_kwargs)
    dst = tmp_path / "out.safetensors"
    convert(exe, src, dst, *flags)
    if expected is None:
        expected = torch.load(src, weights_only=True)
    assert dst.read_bytes() == oracle_bytes(expected, tmp_path)
    return src, dst


# ---- dtypes ---------------------------------------------------------------

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INTS = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
NEW_DTYPES = [
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
    torch.uint16,
    torch.uint32,
    torch.uint64,
]


def sample(dtype, shape=(3, 5)):
    g = torch.Generator().manual_seed(7)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype == torch.complex64:
        return torch.randn(shape, generator=g, dtype=torch.complex64)
    if dtype == torch.float4_e2m1fn_x2:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).view(dtype)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g).abs() + 0.1).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", FLOATS + INTS + [torch.bool, torch.complex64], ids=str)
def test_dtype_with_legacy_storage_name(exe, tmp_path, dtype):
    check(exe, tmp_path, {"x": sample(dtype), "scalar": sample(dtype, ())})


@pytest.mark.parametrize("dtype", NEW_DTYPES + [torch.float4_e2m1fn_x2], ids=str)
def test_new_dtypes_through_untyped_storage(exe, tmp_path, dtype):
    # _rebuild_tensor_v3 with an UntypedStorage; F4 doubles the last dimension.
    check(exe, tmp_path, {"x": sample(dtype), "y": sample(dtype, (2, 2))})


def test_every_dtype_in_one_file_with_empty_and_scalar_tensors(exe, tmp_path):
    state = {f"t{i}": sample(d) for i, d in enumerate(FLOATS + INTS + NEW_DTYPES + [torch.bool, torch.complex64])}
    state.update(empty=torch.empty(0), empty3=torch.empty(2, 0, 3, dtype=torch.int16), zero_d=torch.tensor(2.5))
    check(exe, tmp_path, state)


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex32, torch.bits8], ids=str)
def test_dtypes_without_safetensors_equivalent_are_refused(exe, tmp_path, dtype):
    t = torch.zeros(4, dtype=torch.uint8).view(dtype) if dtype.itemsize == 1 else torch.zeros(4, dtype=dtype)
    torch.save({"x": t}, tmp_path / "c.pt")
    out = run(exe, "convert", tmp_path / "c.pt", tmp_path / "c.safetensors")
    assert out.returncode == 1 and "no safetensors equivalent" in out.stderr, out.stderr
    assert not (tmp_path / "c.safetensors").exists()


def test_meta_tensors_are_skipped_and_quantized_or_sparse_ones_refused(exe, tmp_path):
    w = torch.randn(2)
    src, dst = check(exe, tmp_path, {"w": w, "m": torch.empty(3, device="meta")}, {"w": w})
    report = json.loads(run(exe, "convert", "--json", src, tmp_path / "m.safetensors").stdout)
    assert report["skipped"] == [["m", "meta tensor: float32 [3] has no data"]]
    assert run(exe, "convert", "--strict-meta", src, tmp_path / "m.safetensors").returncode == 1
    cases = {
        "quantized": torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8),
        "per_channel": torch.quantize_per_channel(torch.randn(3, 4), torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 0, 0]), 0, torch.qint8),
        "sparse": torch.randn(3, 3).to_sparse(),
        "csr": torch.randn(3, 3).to_sparse_csr(),
    }
    for name, t in cases.items():
        torch.save({"x": t}, tmp_path / f"{name}.pt")
        out = run(exe, "convert", tmp_path / f"{name}.pt", tmp_path / f"{name}.safetensors")
        assert out.returncode == 1 and ("quantized" in out.stderr or "sparse" in out.stderr), out.stderr
        assert run(exe, "scan", tmp_path / f"{name}.pt").returncode == 0


# ---- geometry ---------------------------------------------------------------


def test_views_shared_storage_strides_and_aliases(exe, tmp_path):
    base = torch.arange(24, dtype=torch.float32)
    state = {
        "base": base,
        "slice": base[2:8],
        "transpose": base.view(4, 6).t(),
        "step": base[::3],
        "permute": base.view(2, 3, 4).permute(2, 0, 1),
        "alias": base,
        "expand": torch.ones(1).expand(5, 3),
        "narrow": base.view(4, 6)[1:3, 2:5],
        # Empty, its offset (25) past the storage's end: torch leaves it unchecked.
        "empty_past_end": base.view(4, 6)[4:, 1:].flatten(),
    }
    assert state["empty_past_end"].storage_offset() > base.numel()
    src, dst = check(exe, tmp_path, state)
    report = json.loads(run(exe, "convert", "--json", src, tmp_path / "again.safetensors").stdout)
    copied = {t["name"] for t in report["tensors"] if t["copied"]}
    assert copied == {"transpose", "step", "permute", "expand", "narrow"}
    assert any({"base", "slice", "alias"} <= set(g) for g in report["shared_storages"])


def test_a_small_slice_of_a_big_storage_writes_only_the_slice(exe, tmp_path):
    big = torch.randn(10_000)
    src, dst = check(exe, tmp_path, {"part": big[100:110]})
    assert dst.stat().st_size < 200


def test_conjugate_and_negative_bits_are_applied(exe, tmp_path):
    c = torch.randn(4, dtype=torch.complex64)
    f = torch.randn(5)
    i = torch.arange(-3, 3, dtype=torch.int32)
    u = torch.tensor([0, 1, 2, 200, 255], dtype=torch.uint8)
    state = {"conj": c.conj(), "neg": f._neg_view(), "neg_int": i._neg_view(), "neg_uint8": u._neg_view()}
    assert state["conj"].is_conj() and state["neg"].is_neg()
    check(exe, tmp_path, state, {k: v.resolve_conj().resolve_neg() for k, v in state.items()})


def test_deduplication_matches_the_references_save_model(exe, tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(6, 4)
            self.head = torch.nn.Linear(4, 6, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    torch.save(model.state_dict(), tmp_path / "tied.pt")
    convert(exe, tmp_path / "tied.pt", tmp_path / "ours.safetensors", "--dedupe")
    ref_pt.save_model(model, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    # The reference writes metadata keys in hash order, so compare contents.
    with safetensors.safe_open(tmp_path / "ours.safetensors", "pt") as ours, safetensors.safe_open(tmp_path / "ref.safetensors", "pt") as ref:
        assert ours.metadata() == ref.metadata() == {"format": "pt", "head.weight": "embed.weight"}
        assert ours.offset_keys() == ref.offset_keys() == ["embed.weight"]
        assert torch.equal(ours.get_tensor("embed.weight"), ref.get_tensor("embed.weight"))
    # Without --dedupe every name is its own copy.
    check(exe, tmp_path, model.state_dict())


# ---- structure -------------------------------------------------------------


def test_module_state_dict_with_metadata_attribute(exe, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    sd = model.state_dict()
    assert hasattr(sd, "_metadata")
    check(exe, tmp_path, sd)


def test_parameters_including_ones_with_python_attributes(exe, tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 2))
    q = torch.nn.Parameter(torch.randn(2))
    q.note = "kept as data, never applied"
    t = torch.randn(4)
    t.extra = 5
    check(exe, tmp_path, {"p": p, "q": q, "t": t}, {"p": p, "q": q, "t": t})


def test_nested_containers_flatten_with_dots(exe, tmp_path):
    a, b, c = torch.randn(2), torch.randn(3), torch.randn(4)
    obj = {"encoder": {"layer": {"w": a}}, "decoder": [b, {"x": c}], "name": "n"}
    src = tmp_path / "nested.pt"
    torch.save(obj, src)
    out = run(exe, "convert", src, tmp_path / "x.safetensors")
    assert out.returncode == 1 and "--flatten" in out.stderr
    convert(exe, src, tmp_path / "x.safetensors", "--flatten")
    expected = {"encoder.layer.w": a, "decoder.0": b, "decoder.1.x": c}
    assert (tmp_path / "x.safetensors").read_bytes() == oracle_bytes(expected, tmp_path)
    # diff reads the checkpoint with the options it was converted with.
    assert run(exe, "diff", src, tmp_path / "x.safetensors").returncode == 2
    assert run(exe, "diff", "--flatten", src, tmp_path / "x.safetensors").returncode == 0


def test_flat_state_dicts_with_other_values_and_picked_tensors(exe, tmp_path):
    t, u = torch.randn(3, 4), torch.randn(2)
    # Tensors by name beside values that hold none: the top level is the state dict.
    src, _ = check(exe, tmp_path, {"model": t, "epoch": 7}, {"model": t})
    report = json.loads(run(exe, "convert", "--json", src, tmp_path / "r.safetensors").stdout)
    assert report["root"] == "" and ["epoch", "7"] in report["non_tensors"]
    # The empty name is a name (the reference writes it).
    check(exe, tmp_path, {"": t, "b": u})

    # A module's non-tensor extra state, as module.state_dict() gives it.
    class WithExtraState(torch.nn.Linear):
        def get_extra_state(self):
            return {"scale": 2, "recipe": "delayed"}

        def set_extra_state(self, state):
            pass

    sd = WithExtraState(3, 2).state_dict()
    src, _ = check(exe, tmp_path, sd, {k: v for k, v in sd.items() if torch.is_tensor(v)})
    report = json.loads(run(exe, "convert", "--json", src, tmp_path / "r.safetensors").stdout)
    assert [p for p, _ in report["non_tensors"]] == ["_extra_state.scale", "_extra_state.recipe"]
    # --key may pick a tensor, named by the key; it is obeyed on a flat dict too.
    src = tmp_path / "picked.pt"
    torch.save({"model": t, "optimizer": {"state": {"m": u}}}, src)
    convert(exe, src, tmp_path / "picked.safetensors", "--key", "model")
    assert (tmp_path / "picked.safetensors").read_bytes() == oracle_bytes({"model": t}, tmp_path)
    torch.save({"a": t, "b": u}, src)
    convert(exe, src, tmp_path / "picked.safetensors", "--key", "b")
    assert (tmp_path / "picked.safetensors").read_bytes() == oracle_bytes({"b": u}, tmp_path)
    # A lone tensor has no name, whatever the options.
    torch.save(t, src)
    for flags in [(), ("--flatten",)]:
        out = run(exe, "convert", *flags, src, tmp_path / "lone.safetensors")
        assert out.returncode == 1 and "one tensor, not a dict of named tensors" in out.stderr, out.stderr
    # A top-level `format` entry cannot be kept: the file's own `format: pt` is there.
    torch.save({"model": {"w": t}, "format": "v2"}, src)
    out = run(exe, "convert", "--keep-metadata", src, tmp_path / "fmt.safetensors")
    assert out.returncode == 1 and "carries `format: pt`" in out.stderr and "without --keep-metadata" in out.stderr, out.stderr
    # Nor can a copy named `format` that --dedupe removes be recorded there.
    torch.save({"model": {"a": t, "format": t}}, src)
    out = run(exe, "convert", "--dedupe", src, tmp_path / "fmt.safetensors")
    assert out.returncode == 1 and "without --dedupe" in out.stderr, out.stderr


def test_training_checkpoint_skips_optimizer_state_unless_asked(exe, tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    ckpt = {"epoch": 7, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(), "weight": model.weight}
    src, dst = check(exe, tmp_path, ckpt, model.state_dict())
    report = json.loads(run(exe, "convert", "--json", src, tmp_path / "r.safetensors").stdout)
    assert report["root"] == "model_state_dict"
    assert any(p == "optimizer_state_dict" and "optimizer" in why for p, why in report["skipped"])
    assert ["epoch", "7"] in report["non_tensors"]
    convert(exe, src, tmp_path / "all.safetensors", "--include-optimizer")
    with safetensors.safe_open(tmp_path / "all.safetensors", "pt") as f:
        names = set(f.keys())
        assert {"optimizer_state_dict.state.0.exp_avg", "optimizer_state_dict.state.0.step", "weight", "bias"} <= names
        assert torch.equal(f.get_tensor("optimizer_state_dict.state.0.exp_avg"), opt.state_dict()["state"][0]["exp_avg"])


def test_lightning_style_checkpoint_keeps_hyperparameters_on_request(exe, tmp_path):
    sd = torch.nn.Linear(2, 2).state_dict()
    ckpt = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": sd,
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}},
        "callbacks": {},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]}],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 0.01, "hidden": [64, 32], "name": "tiny", "dropout": None},
    }
    src, dst = check(exe, tmp_path, ckpt, sd, name="model.ckpt")
    convert(exe, src, tmp_path / "meta.safetensors", "--keep-metadata")
    with safetensors.safe_open(tmp_path / "meta.safetensors", "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["hyper_parameters"]) == ckpt["hyper_parameters"]
    assert meta["epoch"] == "3" and meta["pytorch-lightning_version"] == '"2.4.0"' and meta["format"] == "pt"


# ---- serialization variants --------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickle_protocols(exe, tmp_path, protocol):
    base = torch.randn(6)
    state = collections.OrderedDict(a=base, b=base[1:4], c=torch.arange(4, dtype=torch.int16), s=torch.tensor(True))
    torch.save(state, tmp_path / "p.pt", pickle_protocol=protocol)
    convert(exe, tmp_path / "p.pt", tmp_path / "p.safetensors")
    # weights_only cannot read protocol 4/5 (FRAME): the oracle is the in-memory state.
    assert (tmp_path / "p.safetensors").read_bytes() == oracle_bytes(state, tmp_path)


def test_legacy_stream_format(exe, tmp_path):
    base = torch.randn(4, 5)
    state = {"w": base, "t": base.t(), "row": base[1], "i": torch.arange(3), "b": torch.tensor([True, False])}
    state["empty_past_end"] = base[4:, 1:].flatten()
    src, _ = check(exe, tmp_path, state, None, _use_new_zipfile_serialization=False)
    assert not src.read_bytes().startswith(b"PK")


def test_legacy_stream_with_an_odd_sized_byte_storage(exe, tmp_path):
    # An int16 view of 6 of 7 bytes: torch's legacy writer counts 3 elements
    # but writes all 7 bytes; its reader reads 6 and leaves the last byte.
    odd = torch.arange(7, dtype=torch.uint8)[:6].view(torch.int16)
    src, _ = check(exe, tmp_path, {"h": odd}, None, _use_new_zipfile_serialization=False)
    assert scan_json(exe, src)[1]["verdict"] == "safe"
    # The zip format keeps the 7 bytes as the record, which torch.load
    # refuses: damaged (suspicious), not dangerous.
    torch.save({"h": odd}, tmp_path / "odd_zip.pt")
    code, report = scan_json(exe, tmp_path / "odd_zip.pt")
    assert (code, report["verdict"]) == (1, "suspicious"), report
    assert any("holds 7 bytes but the pickle declares 3 elements of 2 bytes" in f["detail"] for f in report["findings"]), report


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_large_tensors_copied_file_to_file(exe, tmp_path, legacy):
    # ≥ 256 KiB tensors are copied by the kernel from the input file: whole
    # storages, views at an offset, a transposed (gathered) view, small ones.
    g = torch.Generator().manual_seed(3)
    base = torch.randn(300_000, generator=g)
    m = torch.randn(600, 400, generator=g).to(torch.bfloat16)
    state = {
        "base": base,
        "tail": base[1_000:],
        "middle": base[70_001:270_001].view(400, 500),
        "m": m,
        "mt": m.t(),
        "small": torch.arange(7),
        "i8": torch.randint(-128, 127, (1 << 19,), generator=g, dtype=torch.int8),
    }
    check(exe, tmp_path, state, None, _use_new_zipfile_serialization=not legacy)


def test_a_checkpoint_of_many_tensors_is_within_the_limits(exe, tmp_path):
    # torch puts about 8 memo entries per tensor: 130,000 tensors need more
    # than a million (the memo's old bound, which refused this benign file).
    state = {f"layers.{i}.w": torch.full((2,), float(i)) for i in range(130_000)}
    src, _ = check(exe, tmp_path, state, state)
    report = tensafe.scan(src)
    assert report["verdict"] == "safe", report


@pytest.mark.parametrize(
    "variant",
    ["no_byteorder_record", "crc_disabled", "file_object", "dotted_name", "alignment_4096"],
)
def test_zip_writer_variants(exe, tmp_path, variant):
    state = {"w": torch.randn(3, 3), "b": torch.randn(3).to(torch.bfloat16)}
    src = tmp_path / ("a.b.c.pth" if variant == "dotted_name" else "v.pt")
    if variant == "no_byteorder_record":
        torch.save(state, src, _disable_byteorder_record=True)
    elif variant == "crc_disabled":
        torch.serialization.set_crc32_options(False)
        try:
            torch.save(state, src)
        finally:
            torch.serialization.set_crc32_options(True)
    elif variant == "file_object":
        buf = io.BytesIO()
        torch.save(state, buf)
        src.write_bytes(buf.getvalue())
        assert zipfile.ZipFile(src).namelist()[0].startswith("archive/")
    elif variant == "alignment_4096":
        from torch.utils.serialization import config

        old = config.save.storage_alignment
        config.save.storage_alignment = 4096
        try:
            torch.save(state, src)
        finally:
            config.save.storage_alignment = old
    else:
        torch.save(state, src)
        assert zipfile.ZipFile(src).namelist()[0].startswith("a.b.c/")
    convert(exe, src, tmp_path / "v.safetensors")
    assert (tmp_path / "v.safetensors").read_bytes() == oracle_bytes(state, tmp_path)


def rezip(src, dst, compression, transform=lambda name, data: data):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, transform(info.filename, zin.read(info.filename)))


def test_rezipped_with_deflate(exe, tmp_path):
    state = {"w": torch.randn(16, 16), "i": torch.arange(100)}
    torch.save(state, tmp_path / "d.pt")
    rezip(tmp_path / "d.pt", tmp_path / "deflated.pt", zipfile.ZIP_DEFLATED)
    convert(exe, tmp_path / "deflated.pt", tmp_path / "d.safetensors")
    assert (tmp_path / "d.safetensors").read_bytes() == oracle_bytes(state, tmp_path)


def test_big_endian_archive_is_byte_swapped(exe, tmp_path):
    state = {"f": torch.randn(3, 4), "h": torch.randn(5).half(), "c": torch.randn(3, dtype=torch.complex64), "i": torch.arange(-4, 4)}
    torch.save(state, tmp_path / "le.pt")
    sizes = {k: v.element_size() // (2 if v.is_complex() else 1) for k, v in state.items()}
    storage_of = {}
    with zipfile.ZipFile(tmp_path / "le.pt") as z:
        # Map record names to element sizes through the pickle's storage order.
        pkl = z.read("le/data.pkl")
    import pickletools

    keys = [arg for op, arg, _ in pickletools.genops(pkl) if op.name == "BINUNICODE" and arg.isdigit()]
    for key, name in zip(dict.fromkeys(keys), state):
        storage_of[f"le/data/{key}"] = sizes[name]

    def swap(name, data):
        if name == "le/byteorder":
            return b"big"
        unit = storage_of.get(name)
        if unit is None or unit == 1:
            return data
        return b"".join(data[i : i + unit][::-1] for i in range(0, len(data), unit))

    rezip(tmp_path / "le.pt", tmp_path / "be.pt", zipfile.ZIP_STORED, swap)
    convert(exe, tmp_path / "be.pt", tmp_path / "be.safetensors")
    assert (tmp_path / "be.safetensors").read_bytes() == oracle_bytes(state, tmp_path)


def test_whole_model_needs_an_explicit_class_allowance(exe, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    torch.save(model, tmp_path / "model.pt")
    out = run(exe, "convert", tmp_path / "model.pt", tmp_path / "m.safetensors")
    assert out.returncode == 1 and "torch.nn.modules.container.Sequential" in out.stderr and "offset" in out.stderr
    scan = run(exe, "scan", tmp_path / "model.pt")
    assert scan.returncode == 1 and "SUSPICIOUS" in scan.stdout
    convert(exe, tmp_path / "model.pt", tmp_path / "m.safetensors", "--allow-class", "torch.nn.modules.*")
    assert (tmp_path / "m.safetensors").read_bytes() == oracle_bytes(model.state_dict(), tmp_path)


def test_torchscript_archives_are_refused_and_flagged(exe, tmp_path):
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(tmp_path / "ts.pt"))
    out = run(exe, "convert", tmp_path / "ts.pt", tmp_path / "ts.safetensors")
    assert out.returncode == 1 and "TorchScript" in out.stderr
    scan = run(exe, "scan", tmp_path / "ts.pt")
    assert scan.returncode == 1 and "DANGEROUS" in scan.stdout and "TorchScript" in scan.stdout


# ---- the real model ---------------------------------------------------------


def test_real_model_round_trip_is_byte_identical(exe, tmp_path, minilm_path):
    state = ref_pt.load_file(minilm_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    convert(exe, tmp_path / "pytorch_model.bin", tmp_path / "model.safetensors")
    # The original was written by the reference with {"format": "pt"}.
    assert (tmp_path / "model.safetensors").read_bytes() == minilm_path.read_bytes()
    diff = run(exe, "diff", tmp_path / "pytorch_model.bin", minilm_path)
    assert diff.returncode == 0, diff.stdout
    scan = run(exe, "scan", "--json", tmp_path / "pytorch_model.bin")
    assert scan.returncode == 0
    report = json.loads(scan.stdout)[0]
    assert report["verdict"] == "safe" and len(report["tensors"]) == len(state)


def test_folders_as_input_and_output(exe, tmp_path):
    state = {"w": torch.randn(3)}
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    torch.save(state, tmp_path / "in" / "pytorch_model.bin")
    convert(exe, tmp_path / "in", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == oracle_bytes(state, tmp_path)


def test_real_model_sharded(exe, tmp_path, minilm_path):
    state = ref_pt.load_file(minilm_path)
    names = list(state)
    src = tmp_path / "src"
    src.mkdir()
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(shards, 1):
        fname = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save({k: state[k] for k in part}, src / fname)
        weight_map.update({k: fname for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    out = tmp_path / "out"
    convert(exe, src, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(names)
    for i, part in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-00002.safetensors"
        assert all(index["weight_map"][k] == fname for k in part)
        assert (out / fname).read_bytes() == oracle_bytes({k: state[k] for k in part}, tmp_path)
    # diff reads the sharded pickle checkpoint too, by its folder or index.
    for source in [src, src / "pytorch_model.bin.index.json"]:
        out_diff = run(exe, "diff", source, out)
        assert out_diff.returncode == 0 and f"{len(names)} identical tensors" in out_diff.stdout, out_diff.stderr
    changed = dict(state)
    changed[shards[1][0]] = changed[shards[1][0]] + 1
    torch.save({k: changed[k] for k in shards[1]}, src / "pytorch_model-00002-of-00002.bin")
    report = json.loads(run(exe, "diff", "--json", src, out).stdout)
    assert [c["name"] for c in report["changes"]] == [shards[1][0]]
    # A broken safetensors checkpoint is reported as one, by its folder or index.
    (out / "model-00002-of-00002.safetensors").unlink()
    for broken in [out, out / "model.safetensors.index.json"]:
        out_diff = run(exe, "diff", src, broken)
        assert out_diff.returncode == 2 and "missing shard model-00002-of-00002.safetensors" in out_diff.stderr, out_diff.stderr


def test_sharded_dedupe_lists_only_what_the_shards_hold(exe, tmp_path):
    """A tied copy removed by `--dedupe` is in no shard, so the index does not
    list it (tensafe and transformers would refuse an index that did)."""
    src = tmp_path / "src"
    src.mkdir()
    shared = torch.arange(4.0)
    torch.save({"embed": shared, "lm_head": shared}, src / "a.bin")
    torch.save({"norm": torch.ones(2)}, src / "b.bin")
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"embed": "a.bin", "lm_head": "a.bin", "norm": "b.bin"}}))
    out = run(exe, "convert", "--dedupe", src / "pytorch_model.bin.index.json", tmp_path / "out")
    assert out.returncode == 0, out.stderr
    assert run(exe, "inspect", tmp_path / "out").returncode == 0
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == 2 and "norm" in index["weight_map"]
    with tensafe.safe_open(tmp_path / "out", "pt") as f:
        assert sorted(f.keys()) == sorted(index["weight_map"])


# ---- scan and diff ----------------------------------------------------------


def test_scan_reports_benign_files_as_safe(exe, tmp_path):
    torch.save({"w": torch.randn(2)}, tmp_path / "a.pt")
    torch.save({"w": torch.randn(2)}, tmp_path / "b.bin", _use_new_zipfile_serialization=False)
    torch.save({"w": torch.randn(2)}, tmp_path / "c.pt", pickle_protocol=4)
    out = run(exe, "scan", "--json", tmp_path)
    assert out.returncode == 0, out.stdout
    reports = json.loads(out.stdout)
    assert [r["verdict"] for r in reports] == ["safe"] * 3
    assert {r["container"] for r in reports} == {"torch zip", "torch legacy stream"}


def test_scan_flags_a_non_allowlisted_object(exe, tmp_path):
    import argparse

    torch.save({"state_dict": {"w": torch.randn(2)}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "ns.pt")
    out = run(exe, "scan", "--json", tmp_path / "ns.pt")
    assert out.returncode == 1
    report = json.loads(out.stdout)[0]
    assert report["verdict"] == "suspicious"
    imports = [i for p in report["pickles"] for i in p["imports"]]
    assert any(i["global"] == "argparse.Namespace" and i["status"] == "unknown" for i in imports)
    # Conversion refuses at the import, naming it and where it was.
    conv = run(exe, "convert", tmp_path / "ns.pt", tmp_path / "ns.safetensors")
    assert conv.returncode == 1 and "argparse.Namespace" in conv.stderr and "offset" in conv.stderr
    assert "['args']" in conv.stderr


def scan_json(exe, path):
    out = run(exe, "scan", "--json", path)
    return out.returncode, json.loads(out.stdout)[0]


def test_scan_reads_real_joblib_files_to_the_end(exe, tmp_path):
    # joblib writes array bytes inside the pickle stream, after each
    # NumpyArrayWrapper's BUILD (object arrays as a nested pickle); the
    # scanner must step over them and see what comes after.
    import argparse

    joblib = pytest.importorskip("joblib")
    np = pytest.importorskip("numpy")
    objs = np.array([{"a": 1}, collections.Counter("ab")], dtype=object)
    for protocol in (2, 5):
        path = tmp_path / f"m{protocol}.joblib"
        joblib.dump(
            {
                "w": np.arange(1000.0),
                "objs": objs,
                "s": np.array(["ab", "cde"]),
                "empty": np.zeros((0, 3)),
                # Structured: numpy pickles the dtype as void with fields
                # (its size in the state); with an object field, joblib
                # pickles the whole array.
                "rec": np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8", (2,))]),
                "rec_objs": np.array([(1, {"k": 1})], dtype=[("a", "<i4"), ("o", "O")]),
                "ns": argparse.Namespace(lr=0.1),
            },
            path,
            protocol=protocol,
        )
        code, report = scan_json(exe, path)
        assert code == 1 and "error" not in report, report.get("error")
        assert all(p["error"] is None for p in report["pickles"])
        imports = [i["global"] for p in report["pickles"] for i in p["imports"]]
        # From the nested object-array pickle, and from after every array.
        assert "collections.Counter" in imports and imports[-1] == "argparse.Namespace", imports


def test_scan_exit_codes_for_numpy_and_compressed_files(exe, tmp_path):
    import argparse

    joblib = pytest.importorskip("joblib")
    np = pytest.importorskip("numpy")
    np.save(tmp_path / "plain.npy", np.arange(4.0))
    np.savez(tmp_path / "arrays.npz", a=np.arange(3), b=np.ones(2))
    assert [scan_json(exe, tmp_path / f)[0] for f in ("plain.npy", "arrays.npz")] == [0, 0]
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert scan_json(exe, tmp_path / "objects.npy")[0] == 1
    # zlib (joblib's default compression) and gzip files are inflated and
    # scanned: the payload after the array is found; the other wrappers are
    # recognised, not taken for broken pickles: exit 3.
    for method in ("zlib", "gzip", "bz2", "xz", "lzma"):
        path = tmp_path / f"c.joblib.{method}"
        joblib.dump({"w": np.arange(10), "ns": argparse.Namespace(lr=0.1)}, path, compress=(method, 3))
        code, report = scan_json(exe, path)
        if method in ("zlib", "gzip"):
            imports = [i["global"] for p in report["pickles"] for i in p["imports"]]
            assert (code, report["unsupported"], report["container"]) == (1, False, f"{method}-compressed pickle stream"), report
            assert "error" not in report and imports[-1] == "argparse.Namespace", report
        else:
            assert (code, report["unsupported"], report["verdict"]) == (3, True, "error"), (method, report)
    # A malformed file next to an unsupported one: 2 wins; a finding: 1.
    (tmp_path / "broken.pkl").write_bytes(b"\x80\x02}q\x00")
    assert run(exe, "scan", tmp_path / "c.joblib.bz2", tmp_path / "broken.pkl").returncode == 2
    assert run(exe, "scan", tmp_path / "c.joblib.bz2", tmp_path / "objects.npy").returncode == 1


def test_diff_reports_changes_with_max_abs_difference(exe, tmp_path):
    a = {"same": torch.ones(3), "changed": torch.tensor([1.0, 2.0, 3.0]), "gone": torch.zeros(1), "shape": torch.zeros(2, 3)}
    b = {"same": torch.ones(3), "changed": torch.tensor([1.0, 2.5, 0.0]), "new": torch.zeros(1), "shape": torch.zeros(3, 2)}
    ref_pt.save_file(a, tmp_path / "a.safetensors")
    ref_pt.save_file(b, tmp_path / "b.safetensors")
    out = run(exe, "diff", "--json", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert out.returncode == 1
    changes = {c["name"]: c for c in json.loads(out.stdout)["changes"]}
    assert changes["changed"]["change"] == "content" and changes["changed"]["max_abs_difference"] == 3.0
    assert changes["gone"]["change"] == "removed" and changes["new"]["change"] == "added"
    assert changes["shape"]["change"] == "shape" and "same" not in changes
    assert run(exe, "diff", tmp_path / "a.safetensors", tmp_path / "a.safetensors").returncode == 0


# ---- the VM against CPython's pickler ------------------------------------------


def random_value(rng, depth=0):
    """Plain data of the kinds checkpoints carry beside tensors."""
    kinds = ["int", "bigint", "float", "str", "bool", "none"] + (["list", "tuple", "dict", "set", "shared"] if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, 1, -1, 255, 256, 65535, 65536, -(2**31), 2**31, 2**63 - 1, -(2**63), rng.randint(-(10**6), 10**6)])
    if kind == "bigint":
        return rng.choice([1, -1]) * rng.randint(2**64, 2**200)
    if kind == "float":
        return rng.choice([0.0, -0.5, 1e300, 3.141592653589793, rng.uniform(-1e6, 1e6)])
    if kind == "str":
        return rng.choice(["", "a", "é", "日本語", "x" * 300, "tab\there", "quote'\""])
    if kind == "bool":
        return rng.choice([True, False])
    if kind == "none":
        return None
    if kind == "set":
        return set(rng.sample(range(50), rng.randint(0, 5)))
    if kind == "shared":
        shared = [rng.randint(0, 9)]
        return [shared, shared]
    items = [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "list":
        return items
    if kind == "tuple":
        return tuple(items)
    return {f"k{i}": v for i, v in enumerate(items)}


def as_json(v):
    """The JSON tensafe gives for a value (big ints as decimal strings)."""
    if isinstance(v, bool) or v is None or isinstance(v, (float, str)):
        return v
    if isinstance(v, int):
        return v if -(2**63) <= v < 2**63 else str(v)
    if isinstance(v, (set, frozenset)):
        return list(v)  # pickled (and kept) in iteration order
    if isinstance(v, (list, tuple)):
        return [as_json(i) for i in v]
    return {k: as_json(x) for k, x in v.items()}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_vm_decodes_what_cpython_pickles(exe, tmp_path, protocol):
    import random

    rng = random.Random(protocol)
    values = {f"v{i}": random_value(rng) for i in range(60)}
    torch.save({"state_dict": {"w": torch.ones(1)}, **values}, tmp_path / "v.pt", pickle_protocol=protocol)
    convert(exe, tmp_path / "v.pt", tmp_path / "v.safetensors", "--keep-metadata")
    with safetensors.safe_open(tmp_path / "v.safetensors", "pt") as f:
        meta = f.metadata()
    for name, value in values.items():
        assert json.loads(meta[name]) == as_json(value), (name, value)
