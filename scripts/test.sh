#!/usr/bin/env bash
# bash scripts/test.sh — set up and run the test suite on CPU (real DeepSpeed, Ray, PEFT, transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export DS_ACCELERATOR=cpu GLOO_SOCKET_IFNAME=lo HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the formatter and linter configured in pyproject.toml ([tool.ruff]); either failing fails the run
ruff format --check --quiet . && ruff check --quiet .
python -m pytest -q "$@"
