#!/usr/bin/env bash
# Creates .venv from the pinned lock (requirements.lock) with uv, fast and
# reproducible. Uses a CPU build of PyTorch from /opt/wheels when the machine
# has one (uv does not look there on its own); otherwise the lock's torch.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.8
if ! command -v uv >/dev/null 2>&1 || [ "$(uv --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  python3 -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi

PY=${KUBETUNE_PYTHON:-python3}
[ -x .venv/bin/python ] || uv venv --quiet --python "$PY" .venv
uv pip install --quiet --python .venv/bin/python -r requirements.lock
cpu_torch=$(ls /opt/wheels/torch-*.whl 2>/dev/null | sort -V | tail -n 1 || true)
if [ -n "$cpu_torch" ]; then
  uv pip install --quiet --python .venv/bin/python --no-deps "$cpu_torch"
fi
uv pip install --quiet --python .venv/bin/python --no-deps -e .
touch .venv/.installed
