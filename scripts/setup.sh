#!/usr/bin/env bash
# bash scripts/setup.sh — a local .venv with CPU torch 2.13.0 and this package (+ test extras). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# CPU build for this set-up only; GPU users bring their own torch (the package does not pin it)
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
python -c "import torch, deepspeed, peft, transformers, ray; print('ready: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| peft', peft.__version__, '| transformers', transformers.__version__, '| ray', ray.__version__)" 2>&1 | tail -1
