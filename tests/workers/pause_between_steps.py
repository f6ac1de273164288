"""PAUSE_FILE=/tmp/p PAUSE_AFTER_STEP=3 deepspeed --num_gpus 2 tests/workers/pause_between_steps.py --config C.yaml

For tests/distributed/test_resume.py: launch/train.py, except that after step PAUSE_AFTER_STEP (and each later
one) every rank waits while PAUSE_FILE exists, so that a test can act on a job between two steps however fast
the steps are (start a second job into its output_dir, send it a signal). The math is untouched.
"""

import os
import sys
import time
from pathlib import Path

from aletheia_ds import train

PAUSE_FILE = Path(os.environ["PAUSE_FILE"])
AFTER_STEP = int(os.environ.get("PAUSE_AFTER_STEP", "1"))
train_step = train.Run.train_step


def train_step_then_pause(self, step: int) -> None:
    train_step(self, step)
    while step + 1 >= AFTER_STEP and PAUSE_FILE.exists():
        time.sleep(0.05)


train.Run.train_step = train_step_then_pause

if __name__ == "__main__":
    sys.exit(train.cli())
