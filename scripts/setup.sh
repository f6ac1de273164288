#!/usr/bin/env bash
# bash scripts/setup.sh — a local .venv with CPU torch 2.13.0 and this package (+ test extras). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# what the editable install was made from: this checkout and its dependency lists; unchanged, pip would only
# spend ~25 s resolving the same set again
stamp=.venv/.aletheia-ds-installed
wanted="$PWD $(sha256sum pyproject.toml | cut -d' ' -f1)"
installed_here() {  # the package the venv imports (outside this directory) is this checkout's
  [ "$(cd / && python -c 'import aletheia_ds, os; print(os.path.dirname(os.path.dirname(aletheia_ds.__file__)))' 2>/dev/null)" = "$PWD" ]
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && installed_here; then
  echo "aletheia_ds already installed from this checkout (pyproject.toml unchanged); skipping pip"
else
  echo "installing aletheia_ds and its dependencies into .venv (about 25 s when they are there already, minutes on a fresh .venv)"
  python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  # CPU build for this set-up only; GPU users bring their own torch (the package does not pin it)
  python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
  python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
  if installed_here; then echo "$wanted" > "$stamp"; fi
fi
python -c "import torch, deepspeed, peft, transformers, ray; print('ready: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| peft', peft.__version__, '| transformers', transformers.__version__, '| ray', ray.__version__)" 2>&1 | tail -1
