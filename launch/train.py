"""deepspeed --num_gpus 8 launch/train.py --config launch/configs/qwen2_7b_zero3.yaml [section.key=value ...]

Runs probe -> plan -> LoRA training -> adapter export (aletheia_ds.train.main) on every rank.
CPU: DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_addr 127.0.0.1 \
    launch/train.py --config launch/configs/tiny_cpu.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from aletheia_ds.train import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
