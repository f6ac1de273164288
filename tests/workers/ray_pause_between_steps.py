"""ray job submit --working-dir . -- python tests/workers/ray_pause_between_steps.py PAUSE AFTER_STEP --config C.yaml

For tests/distributed/test_ray.py: launch/ray_train.py, except that every Ray Train worker waits after step
AFTER_STEP (and each later one) while PAUSE (a file) exists, so that a test can act on the job between two steps
however fast the steps are (`ray job stop`, SIGTERM to a worker); a worker that has received the stop request
while it waits touches PAUSE.stop-seen, so the test knows when to let it go on. The math is untouched.
"""

import sys
import time
from pathlib import Path

from aletheia_ds.launchers import ray as ray_launcher

PAUSE_FILE, AFTER_STEP = Path(sys.argv[1]), int(sys.argv[2])
worker_loop = ray_launcher.worker_loop


def paused_worker_loop(config: dict) -> None:
    # defined in __main__: Ray ships this function to the workers by value, with PAUSE_FILE and AFTER_STEP
    from aletheia_ds import train

    train_step = train.Run.train_step

    def train_step_then_pause(self, step: int) -> None:
        train_step(self, step)
        while step + 1 >= AFTER_STEP and PAUSE_FILE.exists():
            if self.stop_signal.received_at is not None:
                PAUSE_FILE.with_name(PAUSE_FILE.name + ".stop-seen").touch()
            time.sleep(0.05)

    train.Run.train_step = train_step_then_pause
    worker_loop(config)


if __name__ == "__main__":
    ray_launcher.worker_loop = paused_worker_loop  # what fit() hands to the TorchTrainer
    sys.exit(ray_launcher.cli(sys.argv[3:]))
