import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(autouse=True)
def _release_deepspeed_shared_memory():
    """DeepSpeed's CPU accelerator leaves a /dev/shm buffer per rank of every run (about 70 MB each); remove the
    loopback runs' buffers that appeared during the test, so a whole suite does not fill /dev/shm."""
    shm = Path("/dev/shm")
    pattern = "deepspeed_allreduce_buffer_*_127.0.0.1_*"
    before = set(shm.glob(pattern)) if shm.is_dir() else set()
    yield
    if shm.is_dir():
        for path in set(shm.glob(pattern)) - before:
            path.unlink(missing_ok=True)
