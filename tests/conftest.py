import os
from pathlib import Path
from typing import NamedTuple

import pytest

TESTS = Path(__file__).resolve().parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# worker scripts started as ranks import helpers.* as the tests do; rank_env puts the checkout itself in front
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))

# after the environment: huggingface_hub and DeepSpeed read it when first imported
import torch  # noqa: E402
from helpers.families import random_batches, tiny_model  # noqa: E402
from helpers.ranks import ROOT  # noqa: E402

from aletheia_ds.arch import Layout, describe  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


class TinyFrozen(NamedTuple):
    model: torch.nn.Module
    layout: Layout
    batches: list[dict]


@pytest.fixture
def tiny_frozen():
    """`tiny_frozen(family, batches=(count, batch_size, seq_len), seed=3, **config_overrides)`: a tiny model of
    `family` with every weight frozen, as the probe and LoRA find the base, its layout, and random batches."""

    def build(family: str, batches: tuple[int, int, int] = (2, 2, 10), seed: int = 3, **overrides) -> TinyFrozen:
        model = tiny_model(family, **overrides)
        model.requires_grad_(False)
        return TinyFrozen(model, describe(model), random_batches(*batches, seed=seed))

    return build


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
