#!/usr/bin/env bash
# bash tools/quality/gpu_chain.sh [CACHE] — the study's GPU stages one after another (pretrain, arms, speed), each
# within its time budget, logging to CACHE/log.txt; started in the background on a GPU machine whose commands are
# limited to 10 minutes (`setsid bash tools/quality/gpu_chain.sh /tmp/quality_cache &`, then poll the log).
# Runs resume: a second start skips finished bases and runs. Afterwards, here:
#   python -m tools.quality --stage report --cache CACHE --out docs/quality
set -u
cache=${1:-/tmp/quality_cache}
log=$cache/log.txt
mkdir -p "$cache"
cd "$(dirname "$0")/../.."
{
  python3 -m tools.quality --stage pretrain --cache "$cache" --pretrain-max-s "${PRETRAIN_MAX_S:-300}"
  python3 -m tools.quality --stage arms --cache "$cache" --time-budget-s "${ARMS_BUDGET_S:-900}"
  python3 -m tools.quality --stage speed --cache "$cache" --time-budget-s "${SPEED_BUDGET_S:-240}"
  echo "chain done"
} >> "$log" 2>&1
