#!/usr/bin/env bash
# Install what the core test session needs into the active virtualenv.
# torch==2.13.0 resolves to the CPU build this machine keeps on disk (no CUDA download).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --upgrade pip >/dev/null
python -m pip install "torch==2.13.0" numpy transformers prometheus-client
python -m pip install -e ".[test,bench]"
if [ -d examples ]; then
  for pkg in examples/*/; do
    [ -f "$pkg/pyproject.toml" ] && python -m pip install -e "$pkg"
  done
fi
