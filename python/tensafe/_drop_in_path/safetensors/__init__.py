"""Found first on PYTHONPATH by the processes that a program run with
`python -m tensafe.drop_in` starts: hands them tensafe as `safetensors`.
The import system then returns what `install()` put in `sys.modules`."""

import tensafe.drop_in

tensafe.drop_in.install()
