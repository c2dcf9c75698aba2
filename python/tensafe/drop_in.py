"""Run code written for `safetensors` on tensafe, without changing it.

    python -m tensafe.drop_in your_script.py [args...]

or, as the first import of a program: `import tensafe.drop_in; tensafe.drop_in.install()`.

`install()` registers tensafe's modules under the names `safetensors`,
`safetensors.torch`, `safetensors.numpy`, … in `sys.modules`, so every later
`import safetensors…` (by transformers, diffusers, accelerate, …) gets tensafe.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import runpy
import sys
import types

_SUBMODULES = ("torch", "numpy", "flax", "tensorflow", "mlx", "paddle")


class _LazySubmodules(importlib.abc.MetaPathFinder):
    """Maps `safetensors.<framework>` to `tensafe.<framework>` on first import,
    so a framework is only imported when the program asks for it."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, rest = fullname.partition(".")
        if prefix != "safetensors" or rest not in _SUBMODULES:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(f"tensafe.{rest}"))


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass


def _rust_module_names() -> types.ModuleType:
    """`safetensors._safetensors_rust`: the names the reference's compiled
    module exports, which tensafe partly implements in Python."""
    import tensafe

    module = types.ModuleType("safetensors._safetensors_rust")
    for name in ("safe_open", "_safe_open_handle", "SafetensorError", "serialize", "serialize_file", "deserialize", "TensorSpec", "__version__"):
        setattr(module, name, getattr(tensafe, name))
    return module


def install() -> None:
    """Makes `import safetensors` (and its submodules) resolve to tensafe."""
    import tensafe

    sys.modules["safetensors"] = tensafe
    sys.modules["safetensors._safetensors_rust"] = _rust_module_names()
    for name in _SUBMODULES:
        loaded = sys.modules.get(f"tensafe.{name}")
        if loaded is not None:
            sys.modules[f"safetensors.{name}"] = loaded
    if not any(isinstance(f, _LazySubmodules) for f in sys.meta_path):
        sys.meta_path.insert(0, _LazySubmodules())


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m tensafe.drop_in SCRIPT [ARGS...]  |  python -m tensafe.drop_in -m MODULE [ARGS...]")
    install()
    if sys.argv[1] == "-m":
        sys.argv = sys.argv[2:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
