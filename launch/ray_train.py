"""ray job submit --working-dir . -- \
    python launch/ray_train.py --config launch/configs/tiny_ray.yaml [section.key=value ...]

Ray Train: ray.num_workers workers, each running probe -> plan -> LoRA training -> adapter export
(aletheia_ds.train.main) with DeepSpeed inside; outputs in ray.storage_path/ray.name. See docs/RAY.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from aletheia_ds.launchers.ray import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
