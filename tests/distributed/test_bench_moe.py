"""tools/bench_moe.py --smoke: the job's arms time real steps; the routed expert forward trains as PEFT's does; the
expert-aware plan adapts fewer experts."""

import json
import subprocess
import sys

import pytest
from helpers.ranks import ROOT

from aletheia_ds.launchers.deepspeed import rank_env

pytestmark = pytest.mark.distributed


def test_bench_moe_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/bench_moe.py"), "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=rank_env(cpu=True),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    peft, uniform, aware = json.loads(out.read_text())
    assert [r["variant"] for r in (peft, uniform, aware)] == ["peft_uniform", "uniform", "expert_aware"]
    assert [r["expert_forward"] for r in (peft, uniform, aware)] == ["peft", "routed", "routed"]
    for row in (peft, uniform, aware):
        assert row["steps_timed"] == 3 and row["median_step_s"] > 0 and row["tokens_per_s"] > 0 and row["mfu"] > 0
    # same adapters, batch and optimizer steps: the two expert forwards reach the same loss
    assert uniform["loss_last"] == pytest.approx(peft["loss_last"], rel=1e-5)
    assert uniform["expert_adapters"] == uniform["experts_total"] == 16 and uniform["score_captured"] == 1.0
    assert 0 < aware["expert_adapters"] < uniform["expert_adapters"]
    assert aware["adapted_layers"] < uniform["adapted_layers"]
    assert "uniform (routed) vs peft_uniform" in proc.stdout
