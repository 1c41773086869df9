#!/usr/bin/env bash
# The whole test suite on a fresh machine: creates .venv with the pinned Python packages the
# tests use as references (onnx to check protobuf equality, onnxruntime to run models, numpy),
# then runs `cargo test`. Tests that need them fail (never skip) without them.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
# Pinned: the versions the fixtures and FORMATS.md were checked against.
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
  -r tests/requirements.txt

export ONNX_LORA_PYTHON="$PWD/.venv/bin/python"
# onnxruntime's shared library from the venv, for the ort backend (load-dynamic).
ORT_DIR=$(.venv/bin/python -c "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))")
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(ls "$ORT_DIR"/libonnxruntime.so* | head -n 1)}

cargo test --locked "$@"
