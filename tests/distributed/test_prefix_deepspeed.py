"""Frozen-prefix execution under a real DeepSpeed engine (ZeRO-2 and ZeRO-3, 2 CPU ranks running
tests/workers/prefix_check.py): loss and LoRA grads unchanged, nothing saved below the lowest adapted layer."""

import json
import subprocess

import pytest
import torch
from helpers.ranks import ROOT, save_tiny_llama

from aletheia_ds.launchers.deepspeed import local_command, rank_env

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_frozen_prefix_under_deepspeed(tmp_path, zero):
    model_dir = save_tiny_llama(tmp_path / "model", layers=5)
    out = tmp_path / "result.json"
    cmd = local_command(
        str(ROOT / "tests/workers/prefix_check.py"),
        [str(out), str(ROOT / f"ds_configs/{zero}.json"), str(model_dir)],
        2,
    )
    proc = subprocess.run(cmd, cwd=ROOT, env=rank_env(cpu=True), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    plain, fast, lowest = result["plain"], result["frozen_prefix"], result["lowest"]
    assert lowest == 2
    assert fast["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert plain["grads"].keys() == fast["grads"].keys()
    for name, grad in plain["grads"].items():
        assert torch.allclose(torch.tensor(grad), torch.tensor(fast["grads"][name]), rtol=1e-5, atol=1e-7), name
    assert all(fast["saved"].get(str(i), 0) == 0 for i in range(lowest)), fast["saved"]
    assert fast["saved"].get(str(lowest), 0) > 0
    assert any(plain["saved"].get(str(i), 0) > 0 for i in range(lowest)), plain["saved"]
