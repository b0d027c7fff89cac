#!/usr/bin/env bash
# Creates (or reuses) the project's virtualenv in .venv and installs the package with its test and demo extras.
# torch is pinned to the CPU build (2.13.0); it is only the tests' reference implementation.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test,demo]"
