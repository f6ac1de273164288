"""CRASH_STEP=4 CRASH_POINT=shard CRASH_RANK=1 deepspeed --num_gpus 2 \
    tests/workers/crash_in_checkpoint.py --config C.yaml

Fault injection for tests/distributed/test_resume.py: launch/train.py, except that one rank SIGKILLs itself while
the checkpoint of step CRASH_STEP is being written. Nothing in the package knows about this; the wrapper only
replaces, in this process, the function that is running at the chosen point of the write:

  shard   CRASH_RANK dies in the middle of writing one of DeepSpeed's shard files (half of it on disk)
  rng     CRASH_RANK dies after its DeepSpeed shards and the adapter are written, before its RNG state
  latest  rank 0 dies after renaming the finished checkpoint into place, before `latest` names it
"""

import io
import os
import signal
import sys
from pathlib import Path

import torch

from aletheia_ds import checkpoint
from aletheia_ds.train import cli

STEP_DIR = checkpoint.step_name(int(os.environ["CRASH_STEP"]))
POINT = os.environ["CRASH_POINT"]
RANK = int(os.environ.get("CRASH_RANK", "0"))


def die() -> None:
    print(f"crash_in_checkpoint: rank {os.environ.get('RANK')} SIGKILLs itself at {POINT} of {STEP_DIR}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def mine() -> bool:
    return int(os.environ.get("RANK", "0")) == RANK


if POINT == "shard":
    torch_save = torch.save

    def half_written_save(obj, path, *args, **kwargs):
        if mine() and f".tmp-{STEP_DIR}" in str(path):
            buffer = io.BytesIO()
            torch_save(obj, buffer, *args, **kwargs)
            with open(path, "wb") as handle:
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            die()
        return torch_save(obj, path, *args, **kwargs)

    torch.save = half_written_save
elif POINT == "rng":
    save_rng = checkpoint.save_rng

    def save_rng_or_die(path):
        if mine() and f".tmp-{STEP_DIR}" in str(path):
            die()
        save_rng(path)

    checkpoint.save_rng = save_rng_or_die
elif POINT == "latest":
    write_text_atomic = checkpoint.write_text_atomic

    def write_latest_or_die(path, text):
        if Path(path).name == checkpoint.LATEST and text == STEP_DIR:
            die()
        write_text_atomic(path, text)

    checkpoint.write_text_atomic = write_latest_or_die
else:
    raise SystemExit(f"CRASH_POINT must be shard, rng or latest, got {POINT!r}")

if __name__ == "__main__":
    sys.exit(cli())
