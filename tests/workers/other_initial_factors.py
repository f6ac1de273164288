"""deepspeed --num_gpus 2 tests/workers/other_initial_factors.py --config C.yaml --resume CHECKPOINT

For tests/distributed/test_peft_variants_zero3.py: launch/train.py, except that a PiSSA/OLoRA init comes out
slightly other than it did (as another device's SVD or another library version may give it): every starting factor
kept by adapters.attach.keep_initial_factors is nudged by one part in 10^4, on every rank. Nothing in the package
knows about this; the wrapper only replaces, in this process, the function that keeps the factors.
"""

import sys

from aletheia_ds.adapters import attach
from aletheia_ds.train import cli

keep_initial_factors = attach.keep_initial_factors


def keep_nudged_factors(peft_model) -> None:
    keep_initial_factors(peft_model)
    for tensor in getattr(peft_model, attach.INITIAL_FACTORS).values():
        tensor.mul_(1.0 + 1e-4)


attach.keep_initial_factors = keep_nudged_factors

if __name__ == "__main__":
    sys.exit(cli())
