#!/usr/bin/env bash
# bash scripts/demo.sh — the whole method on the embedded default, 2 CPU ranks under ZeRO-3:
# probe -> plan -> LoRA training -> PEFT adapter export -> reload check with plain PEFT.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export DS_ACCELERATOR=cpu GLOO_SOCKET_IFNAME=lo HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
[ -f examples/tiny/model/model.safetensors ] || python tools/make_tiny_example.py --weights-only
out=$(python -c "import sys, yaml; c=yaml.safe_load(open('launch/configs/tiny_cpu.yaml')); print(c['train']['output_dir'])")
resume=no
for arg in "$@"; do case $arg in train.output_dir=*) out=${arg#train.output_dir=};; --resume|train.resume=*) resume=yes;; esac; done
# the demo starts fresh each time; a fresh run refuses an output_dir that holds an earlier run's checkpoints
[ "$resume" = yes ] || rm -rf "$out/checkpoints"
deepspeed --num_gpus 2 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29517}" \
  launch/train.py --config launch/configs/tiny_cpu.yaml "$@"
aletheia-ds report --run "$out"
aletheia-ds eval --model examples/tiny/model --tokenizer examples/tiny/tokenizer --adapter "$out/adapter" \
  --data examples/tiny/eval.jsonl --seq-len 64 --batch-size 8 --batches 8 \
  --verify-logits "$out/sample_logits.safetensors"
echo "adapter: $out/adapter  (probe.json, plan.json, metrics.jsonl, eval.json and report.md with its plots in $out)"
