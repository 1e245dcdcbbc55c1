#!/usr/bin/env bash
# Create .venv-triton: a Python 3.11 venv (Debian's /usr/bin/python3.11, which the
# Triton Python-backend stub bundled in nvidia-pytriton links against) holding
# nvidia-pytriton, onnxruntime and numpy<2 (pytriton's pin). Idempotent: a venv
# that already imports everything is left as it is.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TRITON_VENV:-$ROOT/.venv-triton}"
PY311=/usr/bin/python3.11

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import pytriton, onnxruntime, numpy; assert int(numpy.__version__.split(".")[0]) < 2' 2>/dev/null; then
  echo "$VENV is ready"
  exit 0
fi

if [ ! -x "$PY311" ]; then
  echo "error: $PY311 not found; install it with: apt-get install -y python3.11 python3.11-venv" >&2
  exit 1
fi

if ! "$PY311" -c 'import ensurepip, venv' 2>/dev/null; then
  echo "python3.11-venv is missing; installing it with apt-get" >&2
  apt-get update -qq
  apt-get install -y -qq python3.11-venv
fi

"$PY311" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "nvidia-pytriton==0.7.0" onnxruntime "numpy<2"
"$VENV/bin/python" -c 'import pytriton, onnxruntime, numpy; print("pytriton ok, numpy", numpy.__version__)'
echo "$VENV is ready"
