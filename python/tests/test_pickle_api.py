"""tensafe.convert and tensafe.scan from Python: pickle checkpoints handled
without ever being unpickled by the library."""

import pathlib
import pickle

import pytest
import torch

import safetensors.torch as ref_pt
import tensafe

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "tiny_mlp.pt"


def test_bundled_example_converts_like_the_oracle(tmp_path):
    report = tensafe.scan(EXAMPLE)
    assert report["verdict"] == "safe", report
    out = tmp_path / "tiny.safetensors"
    converted = tensafe.convert(EXAMPLE, out, keep_metadata=True)
    assert converted["root"] == "model"
    # Oracle: torch's own restricted loader on this benign file, then the reference writer.
    state = torch.load(EXAMPLE, weights_only=True)["model"]
    expected = tmp_path / "expected.safetensors"
    ref_pt.save_file(state, expected, metadata={"format": "pt"})
    with tensafe.safe_open(out, "pt") as ours, tensafe.safe_open(expected, "pt") as theirs:
        assert ours.keys() == theirs.keys()
        for name in theirs.keys():
            assert torch.equal(ours.get_tensor(name), theirs.get_tensor(name)), name
        metadata = ours.metadata()
    assert metadata["format"] == "pt" and metadata["epoch"] == "3"


def test_hostile_pickle_is_refused_and_flagged_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"weight": Payload()}, protocol=2))
    report = tensafe.scan(evil)
    assert report["verdict"] == "dangerous", report
    assert "system" in str(report)
    with pytest.raises(tensafe.SafetensorError, match="system"):
        tensafe.convert(evil, tmp_path / "out.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()
    reports = tensafe.scan([evil, EXAMPLE])
    assert [r["verdict"] for r in reports] == ["dangerous", "safe"]


def test_refusals_escape_the_names_a_hostile_pickle_carries(tmp_path):
    """A GLOBAL naming terminal escapes and a forged line: the refusal quotes
    it with those characters escaped (by tensafe-pickle itself)."""
    evil = tmp_path / "escape.pkl"
    evil.write_bytes(b"\x80\x02cos\x1b[2J\nsys\x1b]0;pwned\x07\n)R.")
    with pytest.raises(tensafe.SafetensorError) as refused:
        tensafe.convert(evil, tmp_path / "out.safetensors")
    message = str(refused.value)
    assert "pwned" in message
    assert not any(c in message for c in "\x1b\x07\n"), repr(message)
    assert "\\u{1b}" in message, repr(message)
