"""Run code written for `safetensors` on tensafe, without changing it.

    python -m tensafe.drop_in your_script.py [args...]
    python -m tensafe.drop_in -m your.module [args...]
    python -m tensafe.drop_in -c "code" [args...]

or, as the first import of a program: `import tensafe.drop_in; tensafe.drop_in.install()`.

`install()` registers tensafe under the names `safetensors`,
`safetensors.torch`, `safetensors.numpy`, …, `safetensors._safetensors_rust`
in `sys.modules`, so every later `import safetensors…` (by transformers,
diffusers, accelerate, …) gets tensafe. Under those names tensafe reports the
version of the reference API it implements (`API_VERSION`), to
`safetensors.__version__` and to `importlib.metadata`, so that libraries'
version checks take the same branches as with the reference, and work where
the reference is not installed at all.

`install()` changes this process only. `python -m tensafe.drop_in` also puts
a `safetensors` package that calls `install()` first on `PYTHONPATH`, so the
Python processes the program starts (multiprocessing's spawn and forkserver
workers, `subprocess`, launchers such as torchrun) run on tensafe too.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import runpy
import sys
import types

#: The `safetensors` release whose API tensafe implements and is tested
#: against; what the `safetensors` names report as their version.
API_VERSION = "0.8.0"

_SUBMODULES = ("torch", "numpy", "flax", "tensorflow", "mlx", "paddle")

# Holds a `safetensors/__init__.py` that calls `install()`; prepended to
# PYTHONPATH for the processes a drop-in program starts.
_CHILD_PATH = os.path.join(os.path.dirname(__file__), "_drop_in_path")


class _Finder(importlib.abc.MetaPathFinder):
    """Maps `safetensors.<framework>` to `tensafe.<framework>` on first import,
    so a framework is only imported when the program asks for it, and answers
    `importlib.metadata` for the `safetensors` distribution."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, rest = fullname.partition(".")
        if prefix != "safetensors" or rest not in _SUBMODULES:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(f"tensafe.{rest}"))

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        # Asked by name only (as version checks ask): a listing of every
        # distribution would otherwise show the reference's twice.
        name = context.name
        if name is not None and name.replace("-", "_").lower() == "safetensors":
            yield _Distribution()


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass


class _Distribution(importlib.metadata.Distribution):
    """The `safetensors` distribution as the drop-in presents it: the
    reference's name and API version, no files of its own."""

    def read_text(self, filename):
        if filename == "METADATA":
            return f"Metadata-Version: 2.1\nName: safetensors\nVersion: {API_VERSION}\nSummary: tensafe, standing in for safetensors (tensafe.drop_in)\n"
        if filename == "top_level.txt":
            return "safetensors\n"
        return None

    def locate_file(self, path):
        return os.path.join(os.path.dirname(__file__), path)


def _alias(name: str, target: types.ModuleType, is_package: bool) -> types.ModuleType:
    """A module called `name` that serves `target`'s attributes (looked up
    when asked, so later additions show too) and reports `API_VERSION`."""
    module = types.ModuleType(name, target.__doc__)
    module.__file__ = target.__file__
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, origin=target.__file__, is_package=is_package)
    if is_package:
        # Marks it a package, so `import safetensors.torch` asks the finders.
        module.__path__ = []
    module.__version__ = API_VERSION
    module.__getattr__ = lambda attribute: getattr(target, attribute)
    module.__dir__ = lambda: sorted(set(dir(target)) | set(vars(module)))
    return module


def install() -> None:
    """Makes `import safetensors` (and its submodules) resolve to tensafe, in
    this process."""
    import tensafe
    from tensafe import _tensafe_rust

    package = sys.modules.get("safetensors")
    if getattr(package, "__file__", None) != tensafe.__file__:
        package = _alias("safetensors", tensafe, is_package=True)
        # The reference's compiled module: the names it exports, some of
        # which tensafe implements in Python.
        package._safetensors_rust = _alias("safetensors._safetensors_rust", _tensafe_rust, is_package=False)
        for name in ("safe_open", "_safe_open_handle"):
            setattr(package._safetensors_rust, name, getattr(tensafe, name))
        # Submodules of a reference imported before: the next import gets tensafe's.
        for name in [n for n in sys.modules if n.startswith("safetensors.")]:
            del sys.modules[name]
        sys.modules["safetensors"] = package
        sys.modules["safetensors._safetensors_rust"] = package._safetensors_rust
    for name in _SUBMODULES:
        loaded = sys.modules.get(f"tensafe.{name}")
        if loaded is not None:
            sys.modules[f"safetensors.{name}"] = loaded
            setattr(package, name, loaded)
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m tensafe.drop_in SCRIPT [ARGS...]  |  -m MODULE [ARGS...]  |  -c CODE [ARGS...]")
    install()
    # Where PYTHONPATH entries go, for children to inherit: through the
    # environment (subprocess), and through sys.path itself (multiprocessing's
    # spawn hands its children the parent's sys.path).
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_CHILD_PATH, os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(1, _CHILD_PATH)
    if sys.argv[1] in ("-m", "-c") and len(sys.argv) < 3:
        sys.exit(f"python -m tensafe.drop_in: {sys.argv[1]} needs an argument")
    if sys.argv[1] == "-m":
        sys.argv = sys.argv[2:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    elif sys.argv[1] == "-c":
        # As `python -c`: the code runs as `__main__`, `sys.argv[0]` is "-c".
        code, sys.argv = sys.argv[2], ["-c", *sys.argv[3:]]
        main_module = types.ModuleType("__main__")
        sys.modules["__main__"] = main_module
        exec(compile(code, "<string>", "exec"), main_module.__dict__)
    else:
        sys.argv = sys.argv[1:]
        script = sys.argv[0]
        if os.path.isfile(script) and not sys.flags.safe_path:
            # As `python script.py` does: the script's own directory (links
            # resolved) comes first, so it imports the modules beside it.
            # (run_path does this itself for directories and zip files; with
            # -P, Python puts nothing there.)
            sys.path[0] = os.path.dirname(os.path.realpath(script))
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
