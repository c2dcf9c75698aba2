"""Found first on PYTHONPATH by the processes that a program run with
`python -m tensafe.drop_in` starts: hands them tensafe as `safetensors`.
The import system then returns what `install()` put in `sys.modules`.

A Python that cannot import tensafe (one of another environment) gets its
own `safetensors`, if it has one, as if this package were not here."""

import os
import sys

try:
    import tensafe.drop_in
except ImportError:
    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _here]
    del sys.modules[__name__]
    import safetensors  # noqa: F401  (that Python's own; it replaces this module)
else:
    tensafe.drop_in.install()
